"""How much work requests may ask of a serving process at once: the one admission policy of
every route that decodes images or runs models (/predict, the curators' previews, the page).

Each kind of work gets ``THREADS`` threads of its own (never the event loop's shared pool,
which /health and the other cheap routes use) and at most ``MAX_WAITING_REQUESTS`` requests
waiting for one; past that a request is answered 503 at once, which Label Studio shows and
a client can retry, instead of queueing without bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio

from label_studio_sahi.errors import Busy

T = TypeVar("T")


class Admission:
    """At most ``threads`` of one kind of work at once, in threads of its own (not the
    event loop's shared pool, which /health uses), and at most ``max_waiting`` requests
    waiting for one; past that, 503 as /predict answers."""

    def __init__(self, what: str, threads: int, max_waiting: int) -> None:
        self.what = what
        self.threads = threads
        self.limiter = anyio.CapacityLimiter(threads)
        self.max_waiting = max_waiting
        # Requests admitted and not done, counted here: the limiter's own count of waiting
        # tasks lags (acquiring yields to the event loop before it queues), so requests
        # arriving together would all pass a check of it.
        self._admitted = 0

    async def run(self, work: Callable[[], T]) -> T:
        if self._admitted >= self.threads + self.max_waiting:
            waiting = self._admitted - self.threads
            raise Busy(
                f"{waiting} {self.what} requests are already waiting for a free thread "
                f"(THREADS={self.threads}, MAX_WAITING_REQUESTS={self.max_waiting}); "
                "try again shortly"
            )
        self._admitted += 1  # no await since the check: no other request came between
        try:
            return await anyio.to_thread.run_sync(work, limiter=self.limiter)
        finally:
            self._admitted -= 1
