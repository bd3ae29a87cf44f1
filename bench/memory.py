"""Peak memory of this process while a block runs (resident set, sampled)."""

from __future__ import annotations

import threading
from types import TracebackType

import psutil


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.mib``: the largest resident set sampled
    every ``every`` seconds during the block, above its level at the start, in MiB."""

    def __init__(self, every: float = 0.02) -> None:
        self._every = every
        self._process = psutil.Process()
        self._done = threading.Event()
        self.base = self.peak = 0
        self.mib = 0.0

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._process.memory_info().rss
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self._every):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        self._sampler.join()
        self.mib = (self.peak - self.base) / 2**20
