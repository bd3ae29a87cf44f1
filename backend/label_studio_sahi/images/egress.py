"""Where image fetches may go: the public internet, Label Studio, and what EGRESS_ALLOW names.

Task image URLs come from whoever can write tasks. Without a policy the backend would fetch
``http://169.254.169.254/`` (a cloud's metadata service), ``http://127.0.0.1:6379/`` or any
host of the private network it sits in, and its error messages would tell a port scan what
answered. So an address that is not global (loopback, private, link-local, carrier-grade
NAT, reserved, multicast) is refused unless it is

* Label Studio's own host (``LABEL_STUDIO_URL``), or
* listed in ``EGRESS_ALLOW``: a network (``10.0.0.0/8``), a host (``minio``), or a
  host with a port (``minio:9000``).

The check runs on every address the host name resolves to, before each request, at every
redirect hop, and the connection goes only to an address that check approved: the name is
resolved once, and :class:`PinnedBackend` (the network layer of the loader's HTTP client)
connects to the approved addresses instead of resolving the name again. A DNS answer that
changes between the check and the connection (rebinding) reaches nothing new. The URL's
host name still goes in the ``Host`` header and TLS's server name and certificate check.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpcore
import httpx

from label_studio_sahi.errors import ImageForbidden, ImageUnreachable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_PORTS = {"http": 80, "https": 443}
# A socket option as httpcore passes them: (level, name, value) or (level, name, None, length).
SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)
# What one check approves: the addresses to connect to, in the resolver's order.
Addresses = tuple[str, ...]


def _kind(ip: IPAddress) -> str:
    for name in ("loopback", "unspecified", "link_local", "private", "multicast", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    return "non-public"


def _endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return host, parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 80)


def _connect_key(url: str) -> tuple[str, int]:
    """``(host, port)`` as httpcore will ask the network backend to connect to them: the
    ASCII (IDNA) host without IPv6 brackets, the scheme's port when none is given."""
    parsed = httpx.URL(url)
    port = parsed.port or DEFAULT_PORTS.get(parsed.scheme, 80)
    return parsed.raw_host.decode("ascii").lower(), port


class EgressPolicy:
    """Refuses URLs whose host resolves to a non-public address that is not allowed, and
    remembers, per thread, the addresses each check approved for the connection to use."""

    def __init__(self, allow: Sequence[str], trusted_urls: Sequence[str | None] = ()) -> None:
        self.networks: list[IPNetwork] = []
        self.hosts: set[str] = set()
        self.endpoints: set[tuple[str, int]] = set()
        for entry in (e.strip().lower() for e in allow if e.strip()):
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            host, _, port = entry.rpartition(":")
            if host and port.isdigit() and (host.endswith("]") or ":" not in host):
                self.endpoints.add((host.strip("[]"), int(port)))  # minio:9000, [::1]:9000
            else:
                self.hosts.add(entry.strip("[]"))  # minio, or a bare IPv6 host
        for url in trusted_urls:
            if url:
                self.endpoints.add(_endpoint(url))
        # Pins live per thread: each request runs on one thread (httpx's sync client connects
        # on the calling thread), and concurrent fetches of the same name must not share one.
        self._local = threading.local()

    def allows_name(self, host: str, port: int) -> bool:
        return host in self.hosts or (host, port) in self.endpoints

    def check(self, url: str, shown: str) -> Addresses | None:
        """Raise :class:`ImageForbidden` if ``url`` may not be fetched (``shown``: the URL as
        error messages may print it); else the addresses its host resolved to, every one
        approved, or ``None`` for a host allowed by name (any address it resolves to)."""
        host, port = _endpoint(url)
        if self.allows_name(host, port):
            # Resolved once, when the connection is made (PinnedBackend), not here: what it
            # resolves to is allowed, so one look-up there is the same as one here.
            return None
        return self.approved(host, port, shown)

    def approved(self, host: str, port: int, shown: str) -> Addresses:
        """Resolve ``host`` once and return its addresses if every one may be fetched."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ImageUnreachable(f"cannot resolve the host of {shown}: {exc}") from None
        allowed = self.allows_name(host, port)  # by name: any address it resolves to
        addresses: list[str] = []
        for info in infos:
            address = str(info[4][0])
            if address in addresses:
                continue
            addresses.append(address)
            if allowed:
                continue
            ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
            if ip.is_global and not ip.is_multicast:
                continue
            if any(ip in network for network in self.networks):
                continue
            raise ImageForbidden(
                f"{shown} resolves to a {_kind(ip)} address ({ip}): refusing to fetch it; "
                "list the host, host:port or its network in EGRESS_ALLOW if it is an image store"
            )
        if not addresses:
            raise ImageUnreachable(f"cannot resolve the host of {shown}: no address")
        return tuple(addresses)

    @contextmanager
    def pinned(self, url: str, shown: str) -> Iterator[None]:
        """Check ``url``; while inside, connections this thread opens to its host and port
        go only to the addresses the check approved."""
        addresses = self.check(url, shown)
        if addresses is None:
            yield
            return
        pins: dict[tuple[str, int], Addresses] = self._pins()
        key = _connect_key(url)
        before = pins.get(key)
        pins[key] = addresses
        try:
            yield
        finally:
            if before is None:
                pins.pop(key, None)
            else:
                pins[key] = before

    def addresses_for(self, host: str, port: int) -> Addresses:
        """Where a connection to ``host:port`` may go now: the addresses pinned by this
        thread's check, or (a connection no check pinned, such as a token refresh) the
        addresses of one fresh look-up, checked the same way."""
        pinned = self._pins().get((host.lower(), port))
        if pinned is not None:
            return pinned
        return self.approved(host.lower(), port, f"{host}:{port}")

    def _pins(self) -> dict[tuple[str, int], Addresses]:
        pins: dict[tuple[str, int], Addresses] | None = getattr(self._local, "pins", None)
        if pins is None:
            pins = self._local.pins = {}
        return pins


class PinnedBackend(httpcore.NetworkBackend):
    """httpcore's network layer, connecting only to addresses the egress policy approved.

    httpcore hands over the URL's host name; instead of letting the socket layer resolve it
    again (which a rebinding DNS server would answer differently), this connects to the
    addresses :meth:`EgressPolicy.addresses_for` gives, one after the other within the one
    connect timeout. TLS is started by httpcore on the returned stream with the URL's host
    as the server name, so SNI and the certificate check are unchanged.
    """

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._sockets = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self._policy.addresses_for(host, port)
        deadline = None if timeout is None else time.monotonic() + timeout
        options = list(socket_options or [])
        failure: Exception | None = None
        for address in addresses:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}")
            try:
                return self._sockets.connect_tcp(address, port, left, local_address, options)
            except httpcore.ConnectError as exc:  # the next address may answer
                failure = exc
        assert failure is not None  # approved() never returns no address
        raise failure

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("image fetches never use unix sockets")

    def sleep(self, seconds: float) -> None:
        self._sockets.sleep(seconds)


def pinned_transport(policy: EgressPolicy) -> httpx.HTTPTransport:
    """An httpx transport (httpx's defaults: HTTP/1.1, TLS verified against the system's
    or SSL_CERT_FILE's CAs) whose connections go through :class:`PinnedBackend`."""
    transport = httpx.HTTPTransport()
    # httpx has no public way to give its pool a network backend: build the pool with the
    # same TLS context and limits, with the backend. No proxy: a proxy would resolve the
    # name itself, and the check here would not be what is connected to.
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=PinnedBackend(policy),
    )
    return transport
