"""Authenticate HTTP requests to Label Studio with either kind of API token.

Label Studio has two kinds of token, and users paste either into ``LABEL_STUDIO_API_KEY``:

* a **legacy token** (40 hex characters): sent as ``Authorization: Token <key>``;
* a **personal access token** (PAT, Label Studio 1.19+): a JWT *refresh* token. Sent
  directly it gets 401; it must first be exchanged at ``POST <base>/api/token/refresh``
  for a short-lived (about 5 minutes) access token, sent as ``Authorization: Bearer``.

:class:`LabelStudioAuth` hides the difference behind ``httpx.Auth``, so it works both as a
client-wide ``httpx.Client(auth=...)`` and as a per-request ``auth=``. It caches the access
token until shortly before it expires, refreshes it once more when Label Studio answers
401 anyway (revoked, clock skew), and serializes refreshes with a lock so that many threads
sharing one client exchange the PAT once, not once each.

The token is only ever attached to requests for Label Studio's own origin: a request
elsewhere passes through untouched, whatever the caller configured. (httpx itself drops the
``Authorization`` header when a redirect leaves the origin, which is what keeps the token away
from presigned cloud-storage URLs.) Tokens never appear in ``repr``, logs or error messages.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, Generator
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)

REFRESH_PATH = "/api/token/refresh"
# Label Studio issues 5-minute access tokens; assume that when a token carries no ``exp``.
DEFAULT_ACCESS_LIFETIME_S = 300.0
# Refresh this long before expiry (at most; short-lived tokens use a fifth of their life),
# so that a token never expires between the check and Label Studio reading it.
REFRESH_MARGIN_S = 30.0
# Used for the refresh request when the request that triggered it carries no timeout.
_DEFAULT_TIMEOUT = httpx.Timeout(10.0)

_DEFAULT_PORTS = {"http": 80, "https": 443}

# What the inner flow yields: a request to send, and whether its response body must be
# read before the flow looks at it (only the token refresh needs the body; image
# responses must stay streamed so that their size can be capped while reading).
_Step = tuple[httpx.Request, bool]


class TokenRefreshError(httpx.HTTPStatusError):
    """Label Studio did not exchange the personal access token for an access token.

    A subclass of ``httpx.HTTPStatusError`` so that callers handling HTTP errors see it;
    ``response`` is the answer of the refresh endpoint (its body is already read).
    """


def same_origin(url_a: str | httpx.URL, url_b: str | httpx.URL) -> bool:
    """True when both URLs have the same scheme, host and port (default ports filled in).

    Relative URLs or URLs with an invalid port have no origin and match nothing.
    """
    origin_a = _origin(str(url_a))
    return origin_a is not None and origin_a == _origin(str(url_b))


def _origin(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower()
        port = parts.port if parts.port is not None else _DEFAULT_PORTS.get(scheme)
    except ValueError:  # e.g. a port that is not a number
        return None
    if not scheme or not host or port is None:
        return None
    return scheme, host, port


def is_personal_access_token(api_key: str) -> bool:
    """A PAT is a JWT: three dot-separated base64url parts, the header starting ``eyJ``."""
    parts = api_key.strip().split(".")
    return api_key.strip().startswith("eyJ") and len(parts) == 3 and all(parts[:2])


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, decoded *without* verifying it (we only read ``exp``/``iat``).

    Returns an empty dict for anything that is not a readable JWT.
    """
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):  # JSON/Unicode errors are ValueErrors
        return {}
    return data if isinstance(data, dict) else {}


def access_token_lifetime(token: str, now: float | None = None) -> float:
    """Seconds for which a freshly issued access token can be used.

    ``exp - iat`` when both are present: both come from Label Studio's clock, so a skewed
    local clock does not matter. Otherwise ``exp`` against the local clock, else 5 minutes.
    """
    claims = jwt_claims(token)
    exp, iat = _number(claims.get("exp")), _number(claims.get("iat"))
    if exp is not None and iat is not None and exp > iat:
        return exp - iat
    if exp is not None:
        return max(0.0, exp - (time.time() if now is None else now))
    return DEFAULT_ACCESS_LIFETIME_S


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class LabelStudioAuth(httpx.Auth):
    """``httpx.Auth`` for Label Studio: legacy ``Token`` or PAT exchanged for ``Bearer``.

    ``base_url`` is Label Studio's URL (``LABEL_STUDIO_URL``, possibly with a path prefix):
    the PAT is exchanged at ``<base_url>/api/token/refresh``, and the token is attached
    only to requests whose origin is the base URL's origin.
    """

    def __init__(self, api_key: str, base_url: str) -> None:
        key = api_key.strip()
        if not key:
            raise ValueError("an empty Label Studio API key cannot authenticate anything")
        if _origin(base_url) is None:
            raise ValueError("the Label Studio URL must be absolute, like http://host:8080")
        self._key = key
        self._base_url = base_url.rstrip("/")
        self._pat = is_personal_access_token(key)
        # A request may be sent twice (after a 401): its body must be replayable.
        self.requires_request_body = self._pat
        self._access: str | None = None
        self._refresh_at = 0.0  # time.monotonic() after which the access token is stale
        self._state_lock = threading.Lock()  # guards _access/_refresh_at; never held over I/O
        self._refresh_lock = threading.Lock()  # one refresh at a time (sync clients)

    @property
    def kind(self) -> Literal["legacy", "pat"]:
        """``"pat"`` for a personal access token (JWT), ``"legacy"`` otherwise."""
        return "pat" if self._pat else "legacy"

    @property
    def base_url(self) -> str:
        return self._base_url

    def __repr__(self) -> str:  # never show the token
        return f"LabelStudioAuth(kind={self.kind!r}, base_url={self._base_url!r})"

    # --- httpx entry points -------------------------------------------------------------

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """The sync flow: holds the refresh lock while exchanging the PAT."""
        flow = self._flow(request, serialize_refresh=True)
        try:
            outgoing, needs_body = next(flow)
            while True:
                response = yield outgoing
                if needs_body:
                    response.read()
                outgoing, needs_body = flow.send(response)
        except StopIteration:
            return
        finally:
            flow.close()  # releases the refresh lock if the client gave up half-way

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        # Unlike httpx's default, never read every response body: an image download must
        # stay a stream so that its size can be capped while it arrives.
        if self.requires_request_body:
            request.read()
        yield from self.auth_flow(request)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        # A threading lock held across an ``await`` would block the event loop (or deadlock
        # it), so async refreshes are not serialized: two concurrent ones are harmless.
        if self.requires_request_body:
            await request.aread()
        flow = self._flow(request, serialize_refresh=False)
        try:
            outgoing, needs_body = next(flow)
            while True:
                response = yield outgoing
                if needs_body:
                    await response.aread()
                outgoing, needs_body = flow.send(response)
        except StopIteration:
            return
        finally:
            flow.close()

    # --- the flow itself, independent of sync/async -------------------------------------

    def _flow(
        self, request: httpx.Request, *, serialize_refresh: bool
    ) -> Generator[_Step, httpx.Response, None]:
        if not same_origin(request.url, self._base_url):
            # Not Label Studio: the token must not go there, whoever asked for it.
            yield request, False
            return
        if not self._pat:
            request.headers["Authorization"] = f"Token {self._key}"
            yield request, False
            return
        token = yield from self._access_token(request, serialize_refresh, stale=None)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request, False
        # A 401 from Label Studio itself (not from a host a redirect led to) with a token we
        # believed valid: it was revoked or expired early. Refresh and try exactly once more.
        if response.status_code == 401 and same_origin(response.url, self._base_url):
            log.info("Label Studio answered 401 to an access token; refreshing it once")
            token = yield from self._access_token(request, serialize_refresh, stale=token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request, False

    def _access_token(
        self, request: httpx.Request, serialize_refresh: bool, stale: str | None
    ) -> Generator[_Step, httpx.Response, str]:
        """A usable access token: the cached one, or a fresh one from the refresh endpoint.

        ``stale`` is a token Label Studio just refused: it is not reused, but if another
        thread already replaced it, that newer token is used without a second refresh.
        """
        lock: contextlib.AbstractContextManager[Any] = (
            self._refresh_lock if serialize_refresh else contextlib.nullcontext()
        )
        with lock:
            with self._state_lock:
                cached = self._access
                if cached is not None and cached != stale and time.monotonic() < self._refresh_at:
                    return cached
            refresh = self._refresh_request(request)
            response = yield refresh, True
            token = self._parse_refresh(refresh, response)
            lifetime = access_token_lifetime(token)
            margin = min(REFRESH_MARGIN_S, lifetime / 5)
            with self._state_lock:
                self._access = token
                self._refresh_at = time.monotonic() + lifetime - margin
            log.debug("exchanged the personal access token (access valid %.0f s)", lifetime)
            return token

    def _refresh_request(self, request: httpx.Request) -> httpx.Request:
        # Requests yielded by an auth flow skip the client's request building, so carry the
        # triggering request's timeout over (without one httpcore would wait forever).
        timeout = request.extensions.get("timeout", _DEFAULT_TIMEOUT.as_dict())
        return httpx.Request(
            "POST",
            self._base_url + REFRESH_PATH,
            json={"refresh": self._key},
            headers={"Accept": "application/json"},
            extensions={"timeout": timeout},
        )

    def _parse_refresh(self, request: httpx.Request, response: httpx.Response) -> str:
        if response.status_code != 200:
            hint = ""
            if response.status_code == 404:
                hint = " (this Label Studio has no personal access tokens: use a legacy token)"
            elif response.status_code in (400, 401, 403):
                hint = " (the token is invalid, expired or revoked: create a new one)"
            raise TokenRefreshError(
                f"Label Studio refused to exchange the personal access token: "
                f"POST {REFRESH_PATH} answered HTTP {response.status_code}{hint}",
                request=request,
                response=response,
            )
        try:
            token = response.json()["access"]
        except (ValueError, KeyError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise TokenRefreshError(
                f"Label Studio answered POST {REFRESH_PATH} without an access token",
                request=request,
                response=response,
            )
        return token
