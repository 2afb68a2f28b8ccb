"""Which network addresses dreamflow may reach on behalf of a client (SSRF guard).

Shared by the image fetcher and webhook delivery in the worker and by the facade's request checks.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
HTTP_SCHEMES = ("http", "https")
_NOT_IN_HOST = frozenset(' <>"{}|\\^`')


class AddressRefused(ValueError):
    """A URL whose host is, or resolves to, an address that is not allowed."""


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """All addresses ``host`` resolves to (one getaddrinfo call)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # scope ids ("fe80::1%eth0") are dropped: the address itself is what gets checked
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def is_allowed_address(ip: IPAddress) -> bool:
    """True for public unicast addresses; IPv4 embedded in IPv6 is judged as IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return is_allowed_address(embedded)
        if ip.is_site_local:
            return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def http_url_problem(url: str) -> str | None:
    """Why ``url`` is not an http(s) URL that can be tried, or None when it is one."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- a port that is no number, or out of range, raises here
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme.lower() not in HTTP_SCHEMES:
        return "not an http(s) URL"
    host = parts.hostname
    if not host:
        return "the URL has no host"
    if any(ch.isspace() or ch in _NOT_IN_HOST or ord(ch) < 32 for ch in host):
        return f"{host!r} is not a valid host name"
    return None


def check_public_url(url: str) -> None:
    """Raise :class:`AddressRefused` unless the URL is an http(s) URL and every address of its host is
    public."""
    problem = http_url_problem(url)
    if problem is not None:
        raise AddressRefused(problem)
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        addresses = resolve_host(host, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError, ValueError):
        raise AddressRefused(f"could not resolve host {host!r}") from None
    for ip in addresses:
        if not is_allowed_address(ip):
            raise AddressRefused(f"address {ip} is private/loopback/link-local and not allowed")
