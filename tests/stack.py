"""The whole training loop as separate processes: a Label Studio stand-in, Redis, an rq worker
process (``ls-sahi worker``), and the server on real HTTP."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from label_studio_sahi.jobs.redis_server import connect
from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.settings import Settings
from label_studio_sahi.versions.bundles import load_base_bundle
from testkit.fake_studio import FakeStudio
from testkit.servers import (
    LiveServer,
    make_settings,
    settings_env,
    start_uvicorn,
    stop_uvicorn,
)

ROOT = Path(__file__).resolve().parents[1]


def stack_settings(
    fake: FakeStudio, redis_url: str | None, detector: Path, model_dir: Path, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "label_studio_url": fake.url,
        "label_studio_api_key": fake.legacy_token,
        "detector_model": str(detector),
        "classifier_model": "",
        "model_dir": model_dir,
        "train_steps": 300,
        "train_batch_size": 4,
        "learning_rate": 1e-3,
        "backbone_learning_rate": 1e-3,
        "holdout_fraction": 0.25,
        # These tests train from random weights on 8 tasks, 2 held out: any gain is a sure
        # one, and the paired bootstrap has nothing to add (its own tests are in
        # test_learning_recipe.py; the e2e test runs it at its default).
        "promote_confidence": 0.0,
        "negative_window_ratio": 0.1,
        "train_after_annotations": 3,
        "train_debounce_seconds": 0,
        "worker_maintenance_interval": 5,
        "swap_poll_seconds": 1,
        "job_retries": 3,
    }
    values.update(overrides)
    return make_settings(**values)


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def kill_with_work_horse(self) -> list[int]:
        """SIGKILL the worker and its work horse together, as a lost machine would.

        rq's work horse runs in its own session, so killing the worker's process group
        alone would leave it running: every descendant is killed by pid.
        """
        parent = psutil.Process(self.process.pid)
        victims = [parent, *parent.children(recursive=True)]
        for proc in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        return [p.pid for p in victims]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # rq's warm shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill_with_work_horse()


def start_worker(settings: Settings, folder: Path, name: str) -> Worker:
    log = folder / f"{name}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "label_studio_sahi.cli", "worker", "--name", name],
        env=settings_env(settings),
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return Worker(process, log)


def job_done(job: Any, workers: list[Worker]) -> bool:
    """The job ended (either way); a worker that died on its own fails the test at once."""
    for worker in workers:
        if worker.process.poll() is not None:
            raise AssertionError(
                f"worker exited {worker.process.returncode}:\n{worker.log.read_text()[-3000:]}"
            )
    return bool(job.get_status(refresh=True) in ("finished", "failed"))


@dataclass
class Stack:
    settings: Settings
    server: LiveServer
    service: Service
    workers: list[Worker] = field(default_factory=list)

    def post(self, route: str, body: Any) -> httpx.Response:
        return httpx.post(f"{self.server.url}{route}", json=body, timeout=120)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        stop_uvicorn(self.server)


def start_stack(settings: Settings, folder: Path, workers: int = 1) -> Stack:
    service = Service(
        settings, load_base_bundle(settings), redis_client=connect(str(settings.redis_url))
    )
    server = start_uvicorn(create_app(settings, service))
    stack = Stack(settings, server, service)
    stack.workers = [start_worker(settings, folder, f"worker{i}") for i in range(workers)]
    return stack


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_health(
    url: str, process: subprocess.Popen[bytes], log: Callable[[], str], timeout: float = 120
) -> None:
    """Wait until ``url``/health answers 200; fail at once, with the log, if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, f"exited {process.returncode}:\n{log()[-3000:]}"
        assert time.monotonic() < deadline, f"no /health answer from {url} after {timeout:.0f} s"
        time.sleep(0.5)
