"""Progress for people waiting at a terminal, and plain JSON lines for pipes.

Commands that wait (``ls-sahi train --wait``, ``ls-sahi predict-project --wait``,
``ls-sahi predict`` over many images) draw a tqdm bar on stderr when stderr is a terminal.
stdout is never touched by the bar: it keeps its JSON (lines when piped), so
``ls-sahi predict *.jpg > out.jsonl`` shows a bar and writes clean JSON.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

# A job that has ended, in rq's words.
ENDED = ("finished", "failed", "stopped", "canceled")


class Bar:
    """A tqdm bar on ``stream`` when it is a terminal; otherwise nothing at all."""

    def __init__(self, desc: str, total: int | None = None, stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        self.shown = stream.isatty()
        self._bar = (
            tqdm(total=total, desc=desc, file=stream, dynamic_ncols=True, leave=True)
            if self.shown
            else None
        )

    def update(
        self, done: int, total: int | None = None, desc: str | None = None, **info: Any
    ) -> None:
        """Move to ``done`` of ``total``; ``info`` (loss, ETA...) is shown after the bar."""
        if self._bar is None:
            return
        if total is not None and total != self._bar.total:
            self._bar.total = total
        if desc is not None and desc != self._bar.desc:
            self._bar.set_description(desc, refresh=False)
        if info:
            self._bar.set_postfix({k: v for k, v in info.items() if v is not None}, refresh=False)
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def follow(
    poll: Callable[[], dict[str, Any]],
    show: Callable[[Bar, dict[str, Any]], None],
    desc: str,
    out: TextIO,
    every: float = 1.0,
) -> dict[str, Any]:
    """Poll a job until it ends: a bar on a terminal's stderr, else each new state as a
    JSON line on ``out``. Returns the last state (its ``status`` is one of ``ENDED``)."""
    bar = Bar(desc)
    last: dict[str, Any] | None = None
    try:
        while True:
            state = poll()
            if bar.shown:
                show(bar, state)
            elif state != last:
                out.write(json.dumps(state) + "\n")
                out.flush()
            last = state
            if state.get("status") in ENDED:
                return state
            time.sleep(every)
    finally:
        bar.close()


def show_training(bar: Bar, state: dict[str, Any]) -> None:
    """A training job's meta: stage, step of steps, loss, ETA."""
    eta = state.get("eta_seconds")
    bar.update(
        int(state.get("step") or 0),
        state.get("steps"),
        desc=str(state.get("stage") or state.get("status")),
        loss=state.get("loss"),
        eta=f"{eta:.0f}s" if isinstance(eta, int | float) else None,
    )


def show_bulk(bar: Bar, state: dict[str, Any]) -> None:
    """A bulk prediction job's meta: tasks done of total, predicted, failed."""
    bar.update(
        int(state.get("done") or 0),
        state.get("total"),
        desc=str(state.get("status")),
        predicted=state.get("predicted"),
        failed=state.get("failed"),
    )
