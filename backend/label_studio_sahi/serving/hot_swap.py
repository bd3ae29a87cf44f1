"""Serving processes learn of new live versions: Redis pub/sub, with a poll as fallback.

The watcher only calls back; loading, validating and swapping live in ``Service``. Pub/sub
is fast but loses messages while disconnected, so every ``poll_seconds`` without a message
the callback runs for all projects anyway.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import redis

from label_studio_sahi.names import LIVE_CHANNEL

log = logging.getLogger(__name__)

STOP_CHECK_SECONDS = 0.5  # how often the watcher looks at its stop flag


class LiveWatcher:
    def __init__(
        self, client: redis.Redis, on_change: Callable[[str | None], None], poll_seconds: float
    ) -> None:
        self.client = client
        self.on_change = on_change  # project id, or None for "check every project"
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # a service closed without being started has none
            self._thread.join(timeout=self.poll_seconds + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(LIVE_CHANNEL)
                self._safe_call(None)  # catch up on anything missed while (re)connecting
                polled = time.monotonic()
                while not self._stop.is_set():
                    # Short waits, so that stop() returns at once (a stopping server must not
                    # sit out a whole poll interval); the poll itself stays poll_seconds.
                    message = pubsub.get_message(timeout=min(STOP_CHECK_SECONDS, self.poll_seconds))
                    if message and message.get("type") == "message":
                        self._safe_call(_project_of(message))
                    elif time.monotonic() - polled >= self.poll_seconds:
                        self._safe_call(None)
                    else:
                        continue
                    polled = time.monotonic()
                pubsub.close()
            except (redis.ConnectionError, OSError) as exc:
                log.warning("live_watcher_disconnected error=%s", type(exc).__name__)
                self._stop.wait(self.poll_seconds)

    def _safe_call(self, project: str | None) -> None:
        try:
            self.on_change(project)
        except Exception:  # a bad checkpoint must not kill the watcher
            log.exception("live_refresh_failed project=%s", project)


def _project_of(message: dict[str, object]) -> str | None:
    """The project a live-pointer message names; None (check every project) if unreadable."""
    try:
        return str(json.loads(message["data"])["project"])  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError):
        return None
