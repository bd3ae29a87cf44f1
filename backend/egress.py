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
redirect hop. What it cannot close: a DNS answer that changes between this check and the
connection (rebinding); SECURITY.md says how to close that with the network itself.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from label_studio_sahi.errors import ImageForbidden, ImageUnreachable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_PORTS = {"http": 80, "https": 443}


def _kind(ip: IPAddress) -> str:
    for name in ("loopback", "unspecified", "link_local", "private", "multicast", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    return "non-public"


def _endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return host, parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 80)


class EgressPolicy:
    """Refuses URLs whose host resolves to a non-public address that is not allowed."""

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

    def allows_name(self, host: str, port: int) -> bool:
        return host in self.hosts or (host, port) in self.endpoints

    def check(self, url: str, shown: str) -> None:
        """Raise :class:`ImageForbidden` if ``url`` may not be fetched (``shown``: the URL as
        error messages may print it)."""
        host, port = _endpoint(url)
        if self.allows_name(host, port):
            return
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ImageUnreachable(f"cannot resolve the host of {shown}: {exc}") from None
        for info in infos:
            ip: IPAddress = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
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
