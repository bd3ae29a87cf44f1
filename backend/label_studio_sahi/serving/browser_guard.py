"""What a browser may make the backend do, and how much work a page may ask of it.

Browsers resend basic-auth credentials on their own, let any page submit forms and send
"simple" requests (``text/plain`` bodies, no CORS preflight) to any origin, loopback
included, and follow a name that a hostile DNS server rebinds to 127.0.0.1. So, for every
request (``check``, called by the server's middleware before basic auth):

* the ``Host`` header must be one ALLOWED_HOSTS allows (400 otherwise): a rebound name
  never reaches a loopback backend;
* a state-changing request (any method but GET, HEAD, OPTIONS) is refused (403) when the
  browser says it comes from another site (``Sec-Fetch-Site: cross-site`` / ``same-site``)
  or its ``Origin`` is not the backend's own; a GET from another site is refused too unless
  it is a navigation (a link), so that no page can make the backend draw previews for it.
  Label Studio, curl and the CLI send neither header and are never refused;
* JSON routes take ``application/json`` only (``require_json``, 415 otherwise): no form or
  ``text/plain`` body a page can send without a preflight is read as JSON;
* bodies are read under MAX_REQUEST_BYTES (``read_body``, 413);
* the curators' page's forms carry a token (``FormTokens``, an HMAC of the project under a
  secret kept in MODEL_DIR, shared by every worker process) that its POST routes check;
* every response gets ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
  ``Referrer-Policy: same-origin`` and, unless the route set its own, a CSP that allows
  nothing (``secure_headers``).

``install`` also gives the page its own ``admission.Admission`` pools (previews, the page
and its actions), bounded as /predict's is, so that /health and /predict never wait
behind the page.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from label_studio_sahi.errors import BackendError, BadRequest, RequestTooLarge
from label_studio_sahi.private_files import write_new
from label_studio_sahi.serving.admission import Admission
from label_studio_sahi.serving.auth import is_loopback
from label_studio_sahi.settings import Settings

T = TypeVar("T")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What a browser says of a request made by a page of another site (Fetch Metadata).
FOREIGN_SITES = frozenset({"cross-site", "same-site"})
# Served on a loopback bind unless ALLOWED_HOSTS says otherwise, on any port.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
ANY_HOST = "*"
FORM_SECRET_FILE = "ui-form-secret"  # in MODEL_DIR, mode 0600
FORM_TOKEN_FIELD = "token"
DEFAULT_PORTS = {"http": 80, "https": 443}

# A response that is not a page needs nothing: no script, style, frame or form.
STRICT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: under it Chromium sends the page's own form posts with "Origin: null",
    # which ``check`` must refuse; same-origin tells no other site where a link came from.
    "Referrer-Policy": "same-origin",
}


class Forbidden(BackendError):
    """A browser asked for something only the backend's own page, or no browser, may ask."""

    status = 403
    code = "forbidden"


class HostNotAllowed(BadRequest):
    """The request's Host header is not one ALLOWED_HOSTS allows."""

    code = "host_not_allowed"


class UnsupportedMediaType(BackendError):
    """A JSON route was sent a body that is not ``application/json``."""

    status = 415
    code = "unsupported_media_type"


# --------------------------------------------------------------------------- hosts


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a Host header or an ALLOWED_HOSTS entry, the name lower-case
    (an IPv6 address in brackets); ``None`` when it is not a host."""
    value = value.strip().lower()
    if not value:
        return None
    if value.count(":") > 1 and not value.startswith("["):
        value = f"[{value}]"  # a bare IPv6 address in ALLOWED_HOSTS
    try:
        parts = urlsplit(f"//{value}")
        port = parts.port
    except ValueError:
        return None
    name = parts.hostname
    if not name or parts.path or parts.query or parts.username is not None:
        return None
    return (f"[{name}]" if ":" in name else name), port


@dataclass(frozen=True)
class HostPolicy:
    """Which Host headers are served: ``names`` on any port, ``pairs`` on theirs."""

    any_host: bool
    names: frozenset[str] = frozenset()
    pairs: frozenset[tuple[str, int]] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> HostPolicy:
        entries = list(settings.allowed_hosts)
        if not entries:
            # Loopback: only this machine connects, and its own tools say localhost; a
            # page's rebound name must not pass. Elsewhere: Label Studio uses whatever
            # name the deployer chose, and the login guards the backend.
            if not is_loopback(settings.host):
                return cls(any_host=True)
            entries = list(LOOPBACK_HOSTS)
        if ANY_HOST in (e.strip() for e in entries):
            return cls(any_host=True)
        hosts, pairs = set(), set()
        for entry in entries:
            parsed = _split_host(entry)
            if parsed is None:
                raise ValueError(f"ALLOWED_HOSTS: {entry!r} is not a host or host:port")
            name, port = parsed
            if port is None:
                hosts.add(name)
            else:
                pairs.add((name, port))
        return cls(False, frozenset(hosts), frozenset(pairs))

    def allows(self, header: str | None) -> bool:
        if self.any_host:
            return True
        parsed = _split_host(header or "")
        if parsed is None:
            return False
        name, port = parsed
        return name in self.names or (port is not None and (name, port) in self.pairs)


# --------------------------------------------------------------------------- requests


def check(request: Request) -> None:
    """Refuse what no browser page of another site, or rebound name, may make us do."""
    policy: HostPolicy = request.app.state.host_policy
    host = request.headers.get("host")
    if not policy.allows(host):
        raise HostNotAllowed(
            f"Host {host!r} is not served here; ALLOWED_HOSTS lists the names this backend "
            "answers to (on a loopback HOST: localhost, 127.0.0.1, [::1])"
        )
    site = request.headers.get("sec-fetch-site", "").lower()
    if request.method in SAFE_METHODS:
        # A link from another site may open the page; an <img> or fetch() of another site
        # may not make the backend load images and run models for it.
        mode = request.headers.get("sec-fetch-mode", "navigate").lower()
        if site in FOREIGN_SITES and mode != "navigate":
            raise Forbidden(
                f"a {site} page may link to this backend but not load from it "
                f"(Sec-Fetch-Site: {site}, Sec-Fetch-Mode: {mode})"
            )
        return
    if site in FOREIGN_SITES:
        raise Forbidden(
            f"a {request.method} from a {site} page is refused (Sec-Fetch-Site: {site}): "
            "browsers resend the login on their own, so only this backend's own page may act"
        )
    origin = request.headers.get("origin")
    if origin is not None and not _same_origin(origin, request.url.scheme, host or ""):
        raise Forbidden(
            f"a {request.method} from origin {origin!r} is refused: only this backend's own "
            "page may act (Label Studio and other servers send no Origin)"
        )


def _same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether ``origin`` is scheme://host of the request (default ports made explicit)."""

    def key(url: str) -> tuple[str, str, int | None] | None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return None
        if not parts.hostname or parts.scheme not in DEFAULT_PORTS:
            return None  # "null" (a sandboxed or redirected page), or not a web origin
        return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]

    ours = key(f"{scheme}://{host}")
    return ours is not None and key(origin.strip().lower()) == ours


def require_json(request: Request) -> None:
    """Refuse a body that is not ``application/json``: a page may send ``text/plain`` or a
    form to any origin without a preflight; Label Studio sends JSON (``requests``'s
    ``json=``), to /setup and /predict and with its webhooks."""
    given = request.headers.get("content-type", "")
    kind = given.split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise UnsupportedMediaType(
            f"this route takes an application/json body, not {given or 'one without a type'!r}"
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing bodies over ``limit`` (MAX_REQUEST_BYTES) bytes before
    reading them whole."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(
            f"request body is {int(declared)} bytes, above MAX_REQUEST_BYTES={limit}"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"request body is above MAX_REQUEST_BYTES={limit}")
    return bytes(body)


def secure_headers(response: Response) -> Response:
    """The headers every response carries; a route's own CSP (the page's) is kept."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    response.headers.setdefault("Content-Security-Policy", STRICT_CSP)
    return response


# --------------------------------------------------------------------------- form tokens


class FormTokens:
    """The token the curators' page puts in its forms and its POST routes check: an HMAC
    of the project under a secret only the backend knows. A page of another origin cannot
    read our page (no CORS), so it cannot learn the token."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def for_model_dir(cls, model_dir: Path) -> FormTokens:
        """The secret in MODEL_DIR, generated once: every worker process, and a restart,
        accept the tokens of pages another one rendered."""
        path = Path(model_dir) / FORM_SECRET_FILE
        for _ in range(2):
            try:
                secret = bytes.fromhex(path.read_text().strip())
                if len(secret) >= 32:
                    return cls(secret)
            except FileNotFoundError:
                pass
            except ValueError:
                raise RuntimeError(f"{path} is not the hex secret this backend wrote") from None
            write_new(path, secrets.token_hex(32))
        raise RuntimeError(f"cannot read the page's form secret in {path}")

    def token(self, project: str) -> str:
        return hmac.new(self._secret, f"ui-form:{project}".encode(), hashlib.sha256).hexdigest()

    def check(self, project: str, given: str) -> None:
        if not hmac.compare_digest(self.token(project).encode(), given.encode()):
            raise Forbidden(
                "the form has no valid token: submit it from this backend's page "
                f"(/ui/{project}), reloaded if the backend's MODEL_DIR changed"
            )


def install(app: Starlette, settings: Settings) -> None:
    """Put what ``check`` and the page need on ``app.state``."""
    state = app.state
    state.host_policy = HostPolicy.from_settings(settings)
    state.form_tokens = FormTokens.for_model_dir(settings.model_dir)
    # Previews and the metrics plot load images and run models; the page and its buttons
    # only read and write Redis. Each has THREADS threads, so neither starves the other.
    state.page_images = Admission("preview", settings.threads, settings.max_waiting_requests)
    state.page_work = Admission("curators' page", settings.threads, settings.max_waiting_requests)
