"""Two fake origins over real HTTP: a Label Studio stand-in and another web server.

Small threaded ``http.server`` instances on 127.0.0.1 play Label Studio (its file
endpoints, the PAT refresh endpoint and the presign redirect) and another origin (a
storage bucket / any web server). Both record the headers they receive so that tests can
prove where a token went and where it never did. Used by ``test_images.py`` and
``test_studio_auth.py``.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from PIL import Image
from pydantic import SecretStr

from label_studio_sahi.settings import Settings

# --- tokens -----------------------------------------------------------------------------

LEGACY = "0123456789abcdef0123456789abcdef01234567"


def _b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def make_jwt(payload: dict[str, Any]) -> str:
    return f"{_b64url({'alg': 'HS256', 'typ': 'JWT'})}.{_b64url(payload)}.c2lnbmF0dXJl"


PAT = make_jwt({"token_type": "refresh", "jti": "pat-1", "user_id": 1})
OTHER_PAT = make_jwt({"token_type": "refresh", "jti": "revoked", "user_id": 1})


# --- images ---------------------------------------------------------------------------


def png(width: int = 24, height: int = 16, color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


# --- the fake servers -----------------------------------------------------------------


@dataclass
class Seen:
    server: str
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None


@dataclass
class State:
    files: dict[str, bytes] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    valid_access: set[str] = field(default_factory=set)
    refreshes: int = 0
    access_lifetime: int = 300
    refresh_delay: float = 0.0
    refresh_redirect: str = ""  # when set, the refresh endpoint answers 307 to this URL
    other_url: str = ""
    streamed_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.files.clear()
            self.seen.clear()
            self.valid_access.clear()
            self.refreshes = 0
            self.access_lifetime = 300
            self.refresh_delay = 0.0
            self.refresh_redirect = ""
            self.streamed_bytes = 0

    def requests_to(self, server: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.server == server]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_role = ""  # "ls" or "other", set per server class
    state: State

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # helpers
    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization") or ""
        if header == f"Token {LEGACY}":
            return True
        with self.state.lock:
            return header.startswith("Bearer ") and header[7:] in self.state.valid_access

    def _record(self) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        path = unquote(parts.path)
        with self.state.lock:
            self.state.seen.append(
                Seen(
                    self.server_role,
                    self.command,
                    path,
                    query,
                    self.headers.get("Authorization"),
                )
            )
        return path, query

    def do_POST(self) -> None:
        path, _ = self._record()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server_role == "ls" and path == "/api/token/refresh":
            if self.state.refresh_redirect:  # 307 keeps the method and the body (the PAT)
                self._send(307, headers={"Location": self.state.refresh_redirect})
                return
            time.sleep(self.state.refresh_delay)
            if json.loads(body or b"{}").get("refresh") != PAT:
                self._send(401, b'{"detail": "Token is invalid or expired"}')
                return
            now = int(time.time())
            with self.state.lock:
                self.state.refreshes += 1
                access = make_jwt(
                    {
                        "token_type": "access",
                        "iat": now,
                        "exp": now + self.state.access_lifetime,
                        "jti": uuid.uuid4().hex,
                    }
                )
                self.state.valid_access.add(access)
            self._send(200, json.dumps({"access": access}).encode())
            return
        self._send(404)

    def do_GET(self) -> None:
        path, query = self._record()
        if path == "/redirect":  # either origin: an open redirector
            self._send(302, headers={"Location": query["to"][0]})
            return
        if path == "/drip":  # a valid start, then one byte every 0.1 s for a minute
            self.send_response(200)
            self.send_header("Content-Length", "600")
            self.end_headers()
            try:
                for _ in range(600):
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:  # the client gave up: what the test wants
                self.close_connection = True
            return
        if self.server_role == "other":
            name = path.removeprefix("/public/")
            if name in self.state.files:
                self._send(200, self.state.files[name], {"Content-Type": "image/png"})
            else:
                self._send(404)
            return
        if path == "/slow":
            time.sleep(1.0)
            self._send(200, png())
            return
        if path == "/loop":
            self._send(302, headers={"Location": "/loop"})
            return
        if path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(50 * 2**20))
            self.end_headers()
            self._stream_until_refused(50 * 2**20)
            return
        if path == "/big-undeclared":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self._stream_until_refused(64 * 2**20)
            return
        if path == "/short-body":
            self.send_response(200)
            self.send_header("Content-Length", "10000")
            self.end_headers()
            self.wfile.write(png()[:100])
            self.close_connection = True
            return
        if path.startswith("/status/"):
            self._send(int(path.removeprefix("/status/")), b"nope")
            return
        if not self._authorized():
            self._send(401, b'{"detail": "Authentication credentials were not provided."}')
            return
        if path.startswith("/data/redirect-away/"):
            target = f"{self.state.other_url}/public/{path.removeprefix('/data/redirect-away/')}"
            self._send(302, headers={"Location": target})
            return
        if path.startswith("/data/upload/"):
            name = path.removeprefix("/data/upload/")
            if name in self.state.files:
                self._send(200, self.state.files[name], {"Content-Type": "image/png"})
            else:
                self._send(404)
            return
        if path == "/data/local-files/":
            name = query.get("d", [""])[0]
            if name in self.state.files:
                self._send(200, self.state.files[name])
            else:
                self._send(404)
            return
        if path.startswith("/tasks/") and path.endswith("/presign/"):
            uri = base64.urlsafe_b64decode(query["fileuri"][0]).decode()
            name = uri.rsplit("/", 1)[-1]
            target = f"{self.state.other_url}/public/{name}?X-Amz-Signature=s3cr3t"
            self._send(302, headers={"Location": target})
            return
        self._send(404)

    def _stream_until_refused(self, total: int) -> None:
        block = b"\x00" * 65536
        sent = 0
        try:
            while sent < total:
                self.wfile.write(block)
                sent += len(block)
        except OSError:  # the client hung up: that is what the test wants
            self.close_connection = True
        with self.state.lock:
            self.state.streamed_bytes = sent


@dataclass
class Servers:
    state: State
    ls: str
    other: str


def _serve(role: str, state: State) -> tuple[ThreadingHTTPServer, str]:
    handler = type(f"{role}Handler", (Handler,), {"server_role": role, "state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@contextmanager
def running_origins() -> Iterator[Servers]:
    """Start both origins (Label Studio and the other one); shut them down on exit."""
    state = State()
    ls_server, ls_url = _serve("ls", state)
    other_server, other_url = _serve("other", state)
    state.other_url = other_url
    try:
        yield Servers(state, ls_url, other_url)
    finally:
        for server in (ls_server, other_server):
            server.shutdown()
            server.server_close()


# --- settings and checks ------------------------------------------------------------


def make_settings(
    ls_url: str | None = None, key: str | None = LEGACY, **overrides: Any
) -> Settings:
    # The "other" origin plays public storage, but lives on loopback: allowed here; the
    # egress tests (test_egress.py) set EGRESS_ALLOW themselves.
    overrides.setdefault("egress_allow", ["127.0.0.1"])
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        label_studio_url=ls_url,
        label_studio_api_key=SecretStr(key) if key is not None else None,
        **overrides,
    )


def assert_secret_free(exc: BaseException, *secrets: str) -> None:
    for secret in (LEGACY, PAT, *secrets):
        assert secret not in str(exc)
