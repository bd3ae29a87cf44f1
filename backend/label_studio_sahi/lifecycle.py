"""Clean stops: SIGTERM (``docker stop``) and SIGINT end ``up``, ``serve`` and ``worker``
with every process they started gone and no job lost.

* :class:`StopSignals` turns the first SIGTERM/SIGINT into ``SystemExit(128 + signal)``, so
  ``finally`` blocks (the worker's stop, the embedded Redis's) run; a signal's default
  action would end the process without them. uvicorn handles the signal itself while it
  serves, then raises it again once the server is down: it lands here. A second signal
  while stopping does not cut the cleanup short: it asks it to hurry (a cold stop).
* :func:`stop_worker`: ``up``'s worker gets SIGTERM (rq's warm shutdown: the running job
  ends), up to ``WORKER_STOP_TIMEOUT`` seconds; then a second SIGTERM (rq's cold shutdown:
  it kills its work horse and ``rq_worker.RequeueingWorker`` puts the job back on its
  queue);
  then SIGKILL.
* :func:`die_with_parent`: a child that the kernel sends SIGTERM when its parent dies,
  even by SIGKILL (Linux ``PR_SET_PDEATHSIG``), so it cannot outlive it.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
COLD_STOP_TIMEOUT = 15.0  # seconds a worker has after its cold stop before SIGKILL
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """For ``Popen(preexec_fn=...)``: the child gets SIGTERM when the thread that started it
    ends, however it ends. Does nothing where ``prctl`` is missing (not Linux)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class StopSignals:
    """SIGTERM/SIGINT handling for a command that must clean up (see the module doc)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._cleaning_up = False
        self._hurry = False

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def cleaning_up(self) -> None:
        """The cleanup has begun: from now on a signal only makes it hurry."""
        self._cleaning_up = True

    def hurry(self) -> bool:
        """A signal came while cleaning up: stop what is left now, without waiting."""
        return self._hurry

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)
        name = signal.Signals(signum).name
        if len(self.received) == 1 and not self._cleaning_up:
            log.info("stopping signal=%s", name)
            self._cleaning_up = True
            raise SystemExit(128 + signum)  # how a shell reports a process a signal ended
        self._hurry = True
        log.warning("stopping_now signal=%s", name)


def stop_worker(
    process: subprocess.Popen[Any], timeout: float, hurry: Callable[[], bool] | None = None
) -> None:
    """Stop an ``ls-sahi worker`` child: warm, then cold after ``timeout`` s (or as soon as
    ``hurry()`` is true), then SIGKILL after ``COLD_STOP_TIMEOUT`` s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # warm: rq finishes the running job first
    warm_since = time.monotonic()
    if not _wait(process, timeout, hurry):
        log.warning("worker_cold_stop pid=%s after=%.0fs", process.pid, timeout)
        # rq ignores a second signal within a second of the first (it guards against a
        # pool and a terminal both sending one): make sure this one counts.
        time.sleep(max(0.0, warm_since + 1.1 - time.monotonic()))
        process.send_signal(signal.SIGTERM)
        if not _wait(process, COLD_STOP_TIMEOUT):
            log.error("worker_killed pid=%s", process.pid)
            process.kill()
    process.wait()


def _wait(
    process: subprocess.Popen[Any], timeout: float, hurry: Callable[[], bool] | None = None
) -> bool:
    """Whether ``process`` ended within ``timeout`` s (False early when ``hurry()``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            process.wait(timeout=0.2)
            return True
        except subprocess.TimeoutExpired:
            if hurry is not None and hurry():
                return False
    return process.poll() is not None
