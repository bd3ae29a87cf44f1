"""Redis on another machine: a password-protected redis-server on TCP, reached through
``REDIS_URL=redis://:password@host:port/0`` by a real worker and the registry; the
password never reaches a log, and a wrong one is a clear error."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from processes import free_port
from rq import Worker
from stack import start_worker, wait_for

from label_studio_sahi.jobs.redis_server import connect, redis_executable
from label_studio_sahi.versions.registry import Registry
from testkit.servers import make_settings

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-redis-passw0rd"


@pytest.fixture
def protected_redis(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(
        [redis_executable(), "--port", str(port), "--bind", "127.0.0.1",
         "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _answers(url), 10, "redis-server with a password")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return bool(connect(url).ping())
    except redis.ConnectionError:
        return False


def test_a_worker_and_the_registry_use_a_password_protected_redis_and_never_log_it(
    protected_redis: str, tmp_path: Path
) -> None:
    settings = make_settings(redis_url=protected_redis, model_dir=tmp_path / "models")
    worker = start_worker(settings, tmp_path, "remote-worker")
    try:
        client = connect(protected_redis)
        wait_for(
            lambda: [w.name for w in Worker.all(connection=client)] == ["remote-worker"],
            60, "the worker registering with Redis",
        )  # fmt: skip
        registry = Registry.for_settings(settings, client)
        registry.publish("3", lambda folder: (folder / "detector").mkdir(), {"status": "accepted"})
        registry.set_live("3", "v1")
        assert Registry.for_settings(settings, connect(protected_redis)).live("3") == "v1"
    finally:
        worker.stop()
    log = worker.log.read_text()
    assert 'redis_url="redis://**********@127.0.0.1' in log, log[-2000:]
    assert PASSWORD not in log


def test_a_wrong_password_is_refused_by_name(protected_redis: str) -> None:
    wrong = protected_redis.replace(PASSWORD, "not-the-password")
    with pytest.raises(redis.AuthenticationError):
        connect(wrong).ping()
