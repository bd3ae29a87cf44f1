"""Two ``ls-sahi up`` on one MODEL_DIR: one Redis between them, and either may stop first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from processes import free_port, redis_servers_of
from stack import wait_for_health

from label_studio_sahi.jobs.redis_server import _answers

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _up(model_dir: Path, port: int, log: Path, detector: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS", "LABEL_STUDIO"))}
    env.update(
        HOST="127.0.0.1", PORT=str(port), MODEL_DIR=str(model_dir), DETECTOR_MODEL=str(detector),
        CLASSIFIER_MODEL="", DEVICE="cpu", TORCH_THREADS="1", HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "label_studio_sahi.cli", "up"],
        env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_two_ups_on_one_model_dir_share_one_redis_and_stop_in_any_order(
    tmp_path: Path, detector_dir: Path
) -> None:
    model_dir = tmp_path / "models"
    ports = [free_port(), free_port()]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    ups = [_up(model_dir, port, log, detector_dir) for port, log in zip(ports, logs, strict=True)]
    try:
        for up, port, log in zip(ups, ports, logs, strict=True):
            wait_for_health(f"http://127.0.0.1:{port}", up, log.read_text)
        redis_folder = model_dir / "redis"
        assert len(redis_servers_of(redis_folder)) == 1
        children = [c for up in ups for c in psutil.Process(up.pid).children(recursive=True)]

        _stop(ups[0])  # the first one goes; the second keeps its queue
        health = httpx.get(f"http://127.0.0.1:{ports[1]}/health").json()
        assert "degraded" not in health, health
        assert _answers(f"unix://{redis_folder / 'redis.sock'}")

        _stop(ups[1])
        assert redis_servers_of(redis_folder) == []
        for log in logs:
            assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        for up in ups:
            if up.poll() is None:
                up.kill()
