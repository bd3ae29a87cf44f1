"""SIGTERM (``docker stop``) and SIGINT (Ctrl-C) to ``ls-sahi up``, ``serve`` and ``worker``:
every process they started is gone afterwards and no job is lost. A job running when the
signal comes is finished (rq's warm shutdown) or, cut short by a cold stop, back on its
queue for the next worker. And a closed pipe ends the CLI quietly."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from processes import free_port, start_cli, stopped
from redis import Redis
from rq import Queue, Worker
from rq.job import Job, JobStatus
from stack import wait_for, wait_for_health

from label_studio_sahi import names
from label_studio_sahi.jobs.redis_server import EmbeddedRedis, _answers, connect

pytestmark = pytest.mark.slow
GONE_TIMEOUT = 30  # seconds for the processes of a stopped command to be gone


def _redis_of(model_dir: Path) -> Redis:
    url = f"unix://{model_dir / names.REDIS_DIR / names.REDIS_SOCKET}"
    wait_for(lambda: _answers(url), 60, "the embedded Redis")
    return connect(url)


def _tree(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    parent = psutil.Process(process.pid)
    return [parent, *parent.children(recursive=True)]


def _left_behind(tree: list[psutil.Process]) -> list[str]:
    """The processes of ``tree`` still running after a bounded wait (zombies are gone: they
    only wait for their parent, or init, to collect their exit status)."""
    _gone, alive = psutil.wait_procs(tree, timeout=GONE_TIMEOUT)
    left = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(proc.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return left


@contextmanager
def _reopened_redis(model_dir: Path) -> Iterator[Redis]:
    """The MODEL_DIR's Redis started again, as the next ``up`` would: what its AOF kept."""
    server = EmbeddedRedis(model_dir / names.REDIS_DIR)
    try:
        yield connect(server.start())
    finally:
        server.stop()


def _running_job(client: Redis, flag: Path) -> Job:
    job = Queue(names.PREDICT_QUEUE, connection=client).enqueue(
        "sleepy_jobs.wait_for_file", str(flag), job_timeout=600
    )
    wait_for(lambda: job.get_status(refresh=True) == JobStatus.STARTED, 120, "the job to start")
    return job


@pytest.fixture
def killer() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a failed test must not leave running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            for proc in _tree(process):
                proc.kill()


SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("command", ["up", "worker"])
def test_a_stop_signal_lets_the_running_job_finish_then_leaves_no_process(
    command: str,
    sig: signal.Signals,
    detector_dir: Path,
    tmp_path: Path,
    killer: list[subprocess.Popen[bytes]],
) -> None:
    model_dir, log, flag = tmp_path / "models", tmp_path / f"{command}.log", tmp_path / "may-end"
    port = free_port()
    process = start_cli(command, model_dir, detector_dir, log, PORT=str(port))
    killer.append(process)
    if command == "up":
        wait_for_health(f"http://127.0.0.1:{port}", process, log.read_text)
    job = _running_job(_redis_of(model_dir), flag)
    tree = _tree(process)  # with the work horse, the scheduler, the keeper and redis-server
    assert any("redis-server" in " ".join(p.cmdline()) for p in tree)

    process.send_signal(sig)
    wait_for(lambda: "warm shut down requested" in log.read_text(), 120, "the worker's warm stop")
    assert process.poll() is None, "exited with its job still running"
    flag.touch()  # the job may end now: the worker finishes it, then everything stops
    stopped(process, log)

    assert process.returncode == 128 + sig or (command == "worker" and process.returncode == 0)
    assert _left_behind(tree) == []
    with _reopened_redis(model_dir) as client:
        job = Job.fetch(job.id, connection=client)
        assert job.get_status() == JobStatus.FINISHED and job.return_value() == "done"


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_stop_signal_to_serve_stops_its_embedded_redis(
    sig: signal.Signals, detector_dir: Path, tmp_path: Path, killer: list[subprocess.Popen[bytes]]
) -> None:
    model_dir, log, port = tmp_path / "models", tmp_path / "serve.log", free_port()
    process = start_cli("serve", model_dir, detector_dir, log, PORT=str(port))
    killer.append(process)
    wait_for_health(f"http://127.0.0.1:{port}", process, log.read_text)
    tree = _tree(process)
    assert any("redis-server" in " ".join(p.cmdline()) for p in tree)

    process.send_signal(sig)
    stopped(process, log)
    assert process.returncode == 128 + sig
    assert _left_behind(tree) == []
    assert "embedded_redis_stopped" in log.read_text()


@pytest.mark.parametrize("command", ["up", "worker"])
def test_a_job_cut_short_by_a_cold_stop_goes_back_on_its_queue_for_the_next_worker(
    command: str, detector_dir: Path, tmp_path: Path, killer: list[subprocess.Popen[bytes]]
) -> None:
    model_dir, log, flag = tmp_path / "models", tmp_path / f"{command}.log", tmp_path / "may-end"
    port = free_port()
    # `up` stops its worker cold once WORKER_STOP_TIMEOUT has passed; a worker of one's own
    # stops cold on a second signal.
    process = start_cli(
        command, model_dir, detector_dir, log, PORT=str(port), WORKER_STOP_TIMEOUT="1"
    )
    killer.append(process)
    if command == "up":
        wait_for_health(f"http://127.0.0.1:{port}", process, log.read_text)
    job = _running_job(_redis_of(model_dir), flag)
    tree = _tree(process)

    process.send_signal(signal.SIGTERM)
    if command == "worker":
        wait_for(lambda: "warm shut down requested" in log.read_text(), 60, "the warm stop")
        # rq takes a second signal within a second of the first for a repeat of it (a pool
        # and a terminal both sending one): this one comes later, so it is the cold stop.
        time.sleep(1.5)
        assert job.get_status(refresh=True) == JobStatus.STARTED
        process.send_signal(signal.SIGTERM)
    stopped(process, log)
    assert _left_behind(tree) == []
    assert "job_requeued_on_cold_stop" in log.read_text()

    with _reopened_redis(model_dir) as client:
        queue = Queue(names.PREDICT_QUEUE, connection=client)
        assert Job.fetch(job.id, connection=client).get_status() == JobStatus.QUEUED
        assert job.id in queue.job_ids and job.id not in queue.started_job_registry.get_job_ids()
        flag.touch()
        next_worker = start_cli("worker --burst", model_dir, detector_dir, tmp_path / "next.log")
        killer.append(next_worker)
        stopped(next_worker, tmp_path / "next.log")
        done = Job.fetch(job.id, connection=client)
        assert done.get_status() == JobStatus.FINISHED and done.return_value() == "done"
        assert Worker.all(connection=client) == []


def test_up_killed_outright_takes_its_worker_and_redis_with_it(
    detector_dir: Path, tmp_path: Path, killer: list[subprocess.Popen[bytes]]
) -> None:
    # SIGKILL (the OOM killer, `docker kill`): up runs no cleanup. The kernel sends its worker
    # SIGTERM (PR_SET_PDEATHSIG), and the Redis keeper ends redis-server once neither holds
    # the users lock any more.
    model_dir, log, port = tmp_path / "models", tmp_path / "up.log", free_port()
    process = start_cli("up", model_dir, detector_dir, log, PORT=str(port))
    killer.append(process)
    wait_for_health(f"http://127.0.0.1:{port}", process, log.read_text)
    tree = _tree(process)
    names_ = " ".join(" ".join(p.cmdline()) for p in tree)
    assert "redis-server" in names_ and "label_studio_sahi.cli worker" in names_

    process.kill()
    process.wait()
    assert _left_behind(tree) == []
