"""Image fetches never reach private addresses, and the token never leaves Label Studio.

Real HTTP servers on loopback (tests/http_origins.py) play Label Studio and an outside
origin; each test asserts on what those servers received, not only on the error."""

from __future__ import annotations

import errno
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from http_origins import LEGACY, PAT, Servers, make_settings, png

import label_studio_sahi.images.fetch as images
from label_studio_sahi.errors import ImageForbidden, ImageUnreachable
from label_studio_sahi.images.fetch import ImageLoader


def _endpoint(url: str) -> str:
    return urlsplit(url).netloc


def _strict(servers: Servers, *allow: str, key: str | None = LEGACY, **overrides: Any) -> Any:
    """The default policy (nothing private allowed but Label Studio), plus ``allow``."""
    return make_settings(servers.ls, key, egress_allow=list(allow), **overrides)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),  # a cloud's metadata
        ("http://10.1.2.3/x.png", "private"),
        ("http://192.168.0.10:6379/", "private"),
        ("http://[::1]:6379/", "loopback"),
        ("http://0.0.0.0:8080/", "unspecified"),
        ("http://[::ffff:127.0.0.1]:9/", "loopback"),
    ],
)
def test_non_public_addresses_are_refused_by_default(servers: Servers, url: str, kind: str) -> None:
    with ImageLoader(_strict(servers)) as loader, pytest.raises(ImageForbidden) as err:
        loader.load(url)
    assert err.value.status == 403
    assert kind in err.value.message and "EGRESS_ALLOW" in err.value.message


def test_a_loopback_server_that_is_not_label_studio_gets_no_request(servers: Servers) -> None:
    servers.state.files["pic.png"] = png()
    for url in (f"{servers.other}/public/pic.png",
                f"http://localhost:{urlsplit(servers.other).port}/public/pic.png"):  # fmt: skip
        with ImageLoader(_strict(servers)) as loader, pytest.raises(ImageForbidden):
            loader.load(url)
    assert servers.state.requests_to("other") == []
    # Listed, it is an image store like any other.
    with ImageLoader(_strict(servers, _endpoint(servers.other))) as loader:
        assert loader.load(f"{servers.other}/public/pic.png").size == (24, 16)


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{other_port}/public/pic.png",  # another port of this machine
        "http://localhost:{other_port}/public/pic.png",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://[::1]:{other_port}/public/pic.png",
    ],
)
def test_every_redirect_hop_is_checked(servers: Servers, target: str) -> None:
    servers.state.files["pic.png"] = png()
    target = target.format(other_port=urlsplit(servers.other).port)
    # Label Studio itself is allowed; its open redirector must not lead anywhere private.
    with ImageLoader(_strict(servers)) as loader, pytest.raises(ImageForbidden) as err:
        loader.load(f"{servers.ls}/redirect?to={quote(target, safe='')}")
    assert "redirected to" in err.value.message
    assert servers.state.requests_to("other") == []


def test_the_token_goes_only_to_label_studios_file_paths(servers: Servers) -> None:
    servers.state.files["a.png"] = png()
    with ImageLoader(_strict(servers)) as loader:
        loader.load(f"{servers.ls}/data/upload/a.png")
        for url in (
            f"{servers.ls}/api/projects",  # an API path given as an image URL
            "/data/upload/../../api/projects",  # a traversal out of /data/
            f"{servers.ls}/data/upload/%2e%2e/%2e%2e/api/projects",
            f"{servers.ls}/redirect?to={quote(servers.ls + '/api/projects', safe='')}",
        ):
            with pytest.raises(ImageUnreachable):
                loader.load(url)
    seen = servers.state.requests_to("ls")
    assert seen[0].path == "/data/upload/a.png" and seen[0].authorization == f"Token {LEGACY}"
    assert [s.authorization for s in seen[1:]] == [None] * (len(seen) - 1), seen


def test_a_presign_redirect_to_storage_never_carries_the_token(servers: Servers) -> None:
    servers.state.files["e.png"] = png(7, 5)
    with ImageLoader(_strict(servers, _endpoint(servers.other))) as loader:
        assert loader.load("s3://bucket/e.png", task_id=3).size == (7, 5)
    assert [s.authorization for s in servers.state.requests_to("other")] == [None]
    # The same storage on a private address nobody allowed: refused after the presign.
    with ImageLoader(_strict(servers)) as loader, pytest.raises(ImageForbidden):
        loader.load("s3://bucket/e.png", task_id=3)
    assert len(servers.state.requests_to("other")) == 1


def test_the_pat_refresh_never_follows_a_redirect(servers: Servers) -> None:
    servers.state.files["a.png"] = png()
    servers.state.refresh_redirect = f"{servers.other}/steal"
    settings = _strict(servers, _endpoint(servers.other), key=PAT)
    with ImageLoader(settings) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load(f"{servers.ls}/data/upload/a.png")
    assert "307" in err.value.message
    assert servers.state.requests_to("other") == []  # the PAT never left


def test_a_drip_feed_is_cut_at_the_deadline_and_at_the_rate_floor(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _strict(servers, image_download_deadline=0.5, image_min_bytes_per_second=0)
    with ImageLoader(settings) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load(f"{servers.ls}/drip")
    assert "IMAGE_DOWNLOAD_DEADLINE" in err.value.message
    monkeypatch.setattr(images, "RATE_GRACE_SECONDS", 0.3)
    with ImageLoader(_strict(servers)) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load(f"{servers.ls}/drip")
    assert "IMAGE_MIN_BYTES_PER_SECOND" in err.value.message


def test_the_rate_floor_counts_from_the_first_byte_not_from_the_request(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /slow thinks for 1 s, then sends a small PNG whole: past the grace since the request,
    # yet no drip (the wait for the first byte is IMAGE_READ_TIMEOUT's business).
    monkeypatch.setattr(images, "RATE_GRACE_SECONDS", 0.3)
    with ImageLoader(_strict(servers)) as loader:
        assert loader.load(f"{servers.ls}/slow").size == (24, 16)
        # A drip once bytes flow is still cut (one byte every 0.1 s, after 0.3 s of it).
        with pytest.raises(ImageUnreachable) as err:
            loader.load(f"{servers.ls}/drip")
    assert "IMAGE_MIN_BYTES_PER_SECOND" in err.value.message


def test_egress_allow_reads_hosts_ports_and_networks_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from label_studio_sahi.settings import Settings

    monkeypatch.setenv("EGRESS_ALLOW", "minio:9000, 10.0.0.0/8,storage.internal")
    assert Settings(_env_file=None).egress_allow == [  # type: ignore[call-arg]
        "minio:9000", "10.0.0.0/8", "storage.internal",
    ]  # fmt: skip


# --- the connection goes where the check approved ----------------------------------------

PUBLIC = "93.184.215.14"  # a global address: the check lets it through


class Resolver:
    """The system resolver (``socket.getaddrinfo``, which both the egress check and the
    socket layer call) answering ``answers[name]`` in turn, the last one from then on: a
    rebinding DNS server, inside the test process. Other names resolve as they do.

    Connections (``socket.create_connection``) are recorded; any to an address outside
    127.0.0.0/8 fails as on a host without a route there, so no test sends a packet off
    this machine."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.lookups: dict[str, int] = dict.fromkeys(answers, 0)
        self.connects: list[tuple[str, int]] = []
        self._getaddrinfo = socket.getaddrinfo
        self._create_connection = socket.create_connection
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", self.create_connection)

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in self.answers:
            return self._getaddrinfo(host, port, *args, **kwargs)
        turn = min(self.lookups[name], len(self.answers[name]) - 1)
        self.lookups[name] += 1
        address = self.answers[name][turn]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]

    def create_connection(self, address: tuple[str, int], *args: Any, **kwargs: Any) -> Any:
        # As the real one does: resolve (a name would be looked up again here), then connect.
        for *_, (ip, port) in self.getaddrinfo(address[0], address[1], 0, socket.SOCK_STREAM):
            self.connects.append((ip, port))
            if ip.startswith("127."):
                return self._create_connection((ip, port), *args, **kwargs)
        raise OSError(errno.ENETUNREACH, "Network is unreachable")


@pytest.mark.parametrize("via", ["direct", "a redirect from Label Studio"])
def test_a_name_rebound_to_loopback_after_the_check_reaches_nothing(
    servers: Servers, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    servers.state.files["pic.png"] = png()
    port = urlsplit(servers.other).port
    # Public when the policy asks, this machine's loopback (where "other" listens) after.
    dns = Resolver(monkeypatch, {"rebind.test": [PUBLIC, "127.0.0.1"]})
    url = f"http://rebind.test:{port}/public/pic.png"
    if via != "direct":
        url = f"{servers.ls}/redirect?to={quote(url, safe='')}"
    with ImageLoader(_strict(servers)) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load(url)
    assert "cannot connect" in err.value.message
    assert servers.state.requests_to("other") == []  # the internal server heard nothing
    assert dns.lookups["rebind.test"] == 1  # resolved once: the check's answer is used
    assert (PUBLIC, port) in dns.connects and ("127.0.0.1", port) not in dns.connects


def test_a_name_allowed_by_egress_allow_is_resolved_once_and_connected_to_that_address(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    servers.state.files["pic.png"] = png()
    port = urlsplit(servers.other).port
    dns = Resolver(monkeypatch, {"store.test": ["127.0.0.1", "127.0.0.2"]})
    with ImageLoader(_strict(servers, "store.test")) as loader:
        assert loader.load(f"http://store.test:{port}/public/pic.png").size == (24, 16)
        assert loader.load(f"http://store.test:{port}/public/pic.png").size == (24, 16)
    assert dns.connects == [("127.0.0.1", port)]  # one connection, kept alive, where resolved
    assert dns.lookups["store.test"] == 1
    assert len(servers.state.requests_to("other")) == 2


@pytest.fixture
def https_store(tmp_path: Path) -> Iterator[tuple[int, Path, list[str | None]]]:
    """An https server on 127.0.0.1 whose self-signed certificate names ``store.test``:
    ``(port, certificate file, the Host headers it received)``; a PNG at any path."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=store.test", "-addext", "subjectAltName=DNS:store.test",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    image = png(5, 3)
    names: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            names.append(self.headers.get("Host"))
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], cert, names
    finally:
        server.shutdown()
        server.server_close()


def test_https_to_a_pinned_address_still_sends_the_name_and_checks_the_certificate(
    servers: Servers,
    monkeypatch: pytest.MonkeyPatch,
    https_store: tuple[int, Path, list[str | None]],
) -> None:
    port, cert, hosts = https_store
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test's certificate only
    Resolver(monkeypatch, {"store.test": ["127.0.0.1"], "wrong.test": ["127.0.0.1"]})
    settings = _strict(servers, "store.test", "wrong.test")
    with ImageLoader(settings) as loader:
        # Connected to 127.0.0.1, yet TLS names store.test (SNI) and the certificate is
        # checked against that name, as is the Host header.
        assert loader.load(f"https://store.test:{port}/x.png").size == (5, 3)
        with pytest.raises(ImageUnreachable):
            loader.load(f"https://wrong.test:{port}/x.png")  # the certificate is not its
    assert hosts == [f"store.test:{port}"]
