"""What a slow client may hold: a deadline for a request's headers and one for its body.

uvicorn closes an idle kept-alive connection after ``timeout_keep_alive``, but once a
client has sent one byte it waits for the rest forever: one header line a second, or a
body at 1 byte/s, holds a connection (and, for a body, a request in the app) as long as the
client likes. :class:`LimitedH11Protocol` is uvicorn's h11 protocol with two timers:

* ``HEADER_TIMEOUT``: from the connection's start, or from the end of the previous response
  on a kept-alive connection, to the end of the request's headers. Past it the connection
  is closed: with a 408 if part of a request arrived, silently if the client sent nothing
  (an idle connection is not a request, and an unasked-for 408 confuses clients that reuse
  connections).
* ``BODY_DEADLINE``: from the end of the headers to the end of the body. Past it the
  client gets a 408 JSON error like every other (``{"error", "detail", "status_code"}``),
  unless a response already started, and the connection is closed; the app sees the client
  as gone.

:func:`uvicorn_options` / :func:`uvicorn_config` are the one place the server's uvicorn
settings come from, for ``ls-sahi serve`` (one process or ``WORKERS`` > 1) and for tests.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any, cast

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from label_studio_sahi.errors import BackendError
from label_studio_sahi.settings import Settings

# Seconds an idle kept-alive connection stays open between requests (uvicorn's default).
KEEP_ALIVE_SECONDS = 5.0
# Set in a request's ASGI scope when BODY_DEADLINE cut it: the app, which then sees the
# client disconnect, can tell a deadline from a client that left (serving.routes logs which).
BODY_TIMED_OUT = "label_studio_sahi.body_timed_out"


class RequestTimeout(BackendError):
    """The client took longer than HEADER_TIMEOUT or BODY_DEADLINE to send its request."""

    status = 408
    code = "request_timeout"


def _timeout_response(error: RequestTimeout) -> bytes:
    """A whole 408 answer that closes the connection, written without the app (which is
    not running yet, or is waiting for a body that will not come)."""
    body = json.dumps(error.to_json()).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with the header timeout and the body deadline.

    The timers follow h11's view of the client: while the client's state is IDLE (no
    request headers yet) the header timer runs; while it is SEND_BODY the body timer runs.
    Both are re-evaluated after every piece of data and every finished response, which is
    where uvicorn advances h11.
    """

    def __init__(
        self, *args: Any, header_timeout: float, body_deadline: float, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._body_deadline = body_deadline
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._request_started = False  # a byte of the next request has arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # From the start, not the first byte: a connection that never sends one is held too.
        self._follow_request()

    def data_received(self, data: bytes) -> None:
        if data and self.conn.their_state is h11.IDLE:
            self._request_started = True
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._follow_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    # --- the timers -----------------------------------------------------------------------

    def _follow_request(self) -> None:
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(
                    self._header_timeout, self._headers_too_slow
                )
        else:
            self._cancel_header_timer()
        if state is h11.SEND_BODY:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self._body_deadline, self._body_too_slow)
        else:
            self._cancel_body_timer()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._request_started = False

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._request_started:
            self.transport.write(
                _timeout_response(
                    RequestTimeout(
                        f"the request's headers did not arrive within {self._header_timeout:g} s "
                        "(HEADER_TIMEOUT)"
                    )
                )
            )
        self.transport.close()

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self.transport.write(
                _timeout_response(
                    RequestTimeout(
                        f"the request's body did not arrive within {self._body_deadline:g} s "
                        "of its headers (BODY_DEADLINE)"
                    )
                )
            )
        if cycle is not None:
            # The app waiting for the body hears the client is gone, and whatever it
            # answers now is dropped: the 408 was the answer.
            cast(dict[str, Any], cycle.scope)[BODY_TIMED_OUT] = True
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def limited_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """The protocol uvicorn builds per connection, with the settings' deadlines.

    A ``functools.partial`` of a module-level class, not a class made here: with
    ``WORKERS`` > 1 uvicorn pickles its config to each worker process, and a partial of an
    importable class pickles; uvicorn only calls it with the connection's arguments.
    """
    factory = functools.partial(
        LimitedH11Protocol,
        header_timeout=settings.header_timeout,
        body_deadline=settings.body_deadline,
    )
    return cast(type[asyncio.Protocol], factory)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` for this backend: where it
    listens, the protocol with the deadlines, and logging left to ``logs.configure``."""
    return {
        "host": settings.host,
        "port": settings.port,
        "http": limited_protocol(settings),
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "log_config": None,
    }


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The ``uvicorn.Config`` serving ``app`` with :func:`uvicorn_options` (``overrides``
    win: tests listen on 127.0.0.1, port 0)."""
    return uvicorn.Config(app, **{**uvicorn_options(settings), **overrides})
