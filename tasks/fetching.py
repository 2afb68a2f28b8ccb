"""Fetch training images on behalf of users: http(s), ``data:`` URIs and dreamflow's own links.

Everything a stranger's URL can do to the worker is bounded here: the scheme (http/https/data
only), where the connection goes (no private, loopback, link-local, multicast or reserved
addresses unless allowed; the host is resolved once and the connection pinned to the checked
address so DNS rebinding cannot swap it), how many redirects are followed (each hop re-checked),
how long it may take, how many bytes it may send, and what the bytes are (sniffed from magic
bytes, never from Content-Type).

Plain module: no Prefect import. The Prefect task wraps :func:`fetch_images`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from flows.imagebytes import sniff_image_extension
from flows.netguard import IPAddress, is_allowed_address, resolve_host

ReadOwn = Callable[[str], bytes | None]

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_SNIFF_BYTES = 16
_USER_AGENT = "dreamflow-fetch/0.1"


class ImageFetchError(Exception):
    """An image could not be fetched; ``reason`` says why in words a user can act on."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = redact_url(url)
        self.reason = reason
        super().__init__(f"{self.url}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # survive pickling across processes
        return (type(self), (self.url, self.reason))


class _RetryableFetchError(ImageFetchError):
    """A timeout, connection error or 5xx: worth another try."""


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one image download."""

    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 15.0  # connect and per-read timeout
    allow_private: bool = False
    max_redirects: int = 3
    retries: int = 2  # extra attempts, only after timeouts, connection errors and 5xx
    backoff_s: float = 0.5  # first retry waits this long, then doubles
    total_timeout_s: float = 120.0  # whole body of one attempt, against slow trickles


def redact_url(url: str, max_chars: int = 200) -> str:
    """Shorten a URL for messages: data: URIs lose their payload, passwords are dropped."""
    if url[:5].lower() == "data:":
        header, _, payload = url.partition(",")
        if payload.startswith("…(") and payload.endswith(" bytes)"):
            return url  # already redacted
        mime = header[5:].split(";")[0] or "text/plain"
        encoding = ";base64" if header.lower().endswith(";base64") else ""
        size = len(payload) * 3 // 4 if encoding else len(payload)
        return f"data:{mime}{encoding},…({size} bytes)"
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url if len(url) <= max_chars else url[: max_chars - 1] + "…"


def _pick_address(url: str, host: str, port: int, limits: FetchLimits) -> IPAddress:
    """Resolve ``host`` once; refuse it if any address is off limits; return the one to use."""
    try:
        addresses = resolve_host(host, port)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageFetchError(url, f"could not resolve host {host!r}") from exc
    if not addresses:
        raise ImageFetchError(url, f"could not resolve host {host!r}")
    if not limits.allow_private:
        for ip in addresses:
            if not is_allowed_address(ip):
                raise ImageFetchError(
                    url, f"address {ip} is private/loopback/link-local and not allowed"
                )
    return addresses[0]


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


def _check_size(url: str, size: int, limits: FetchLimits) -> None:
    if size > limits.max_bytes:
        raise ImageFetchError(url, f"download larger than {_mb(limits.max_bytes)}")


def _check_image(url: str, head: bytes) -> str:
    ext = sniff_image_extension(head)
    if ext is None:
        raise ImageFetchError(url, f"not an image (content starts with {head[:_SNIFF_BYTES]!r})")
    return ext


def _decode_data_uri(url: str, limits: FetchLimits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageFetchError(url, "malformed data: URI (no comma)")
    if header.lower().endswith(";base64"):
        _check_size(url, len(payload) * 3 // 4, limits)
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageFetchError(url, "malformed base64 in data: URI") from exc
    data = urllib.parse.unquote_to_bytes(payload)
    _check_size(url, len(data), limits)
    return data


def _pinned_request(
    client: httpx.Client, url: httpx.URL, ip: IPAddress
) -> httpx.Request:
    """A GET for ``url`` sent to ``ip``: original Host header, and SNI + cert check for https."""
    extensions = {}
    if url.scheme == "https" and not _is_ip_literal(url.host):
        extensions["sni_hostname"] = url.host
    host_header = url.netloc.decode("ascii")
    return client.build_request(
        "GET",
        url.copy_with(host=str(ip)),
        headers={"Host": host_header, "Accept-Encoding": "identity", "Accept": "image/*"},
        extensions=extensions,
    )


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _read_body(url: str, response: httpx.Response, limits: FetchLimits) -> bytes:
    """Stream the body, stopping as soon as it is too large, not an image or too slow."""
    length = response.headers.get("content-length")
    if length is not None and length.isdigit():
        _check_size(url, int(length), limits)
    encoding = response.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", ""):
        raise ImageFetchError(url, f"compressed response (Content-Encoding: {encoding}) refused")
    deadline = time.monotonic() + limits.total_timeout_s
    body = bytearray()
    sniffed = False
    for chunk in response.iter_raw():
        body += chunk
        _check_size(url, len(body), limits)
        if not sniffed and len(body) >= _SNIFF_BYTES:
            _check_image(url, bytes(body))
            sniffed = True
        if time.monotonic() > deadline:
            raise _RetryableFetchError(url, f"timed out after {limits.total_timeout_s:g} s")
    return bytes(body)


def _get_once(client: httpx.Client, url: str, limits: FetchLimits) -> bytes:
    """One attempt: follow up to ``max_redirects`` redirects, re-checking every hop."""
    current = httpx.URL(url)
    for _hop in range(limits.max_redirects + 1):
        if current.scheme not in ("http", "https"):
            raise ImageFetchError(url, f"redirect to scheme {current.scheme!r} is not allowed")
        ip = _pick_address(url, current.host, current.port or _default_port(current), limits)
        request = _pinned_request(client, current, ip)
        response = client.send(request, stream=True)
        try:
            status = response.status_code
            if status in _REDIRECT_CODES and "location" in response.headers:
                current = current.join(response.headers["location"])
                continue
            if status >= 500:
                raise _RetryableFetchError(url, f"HTTP {status}")
            if not 200 <= status < 300:
                raise ImageFetchError(url, f"HTTP {status}")
            return _read_body(url, response, limits)
        finally:
            response.close()
    raise ImageFetchError(url, f"more than {limits.max_redirects} redirects")


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80


def _download(url: str, limits: FetchLimits, client: httpx.Client) -> bytes:
    """GET with retries and exponential backoff on timeouts, connection errors and 5xx."""
    for attempt in range(limits.retries + 1):
        try:
            return _get_once(client, url, limits)
        except httpx.TimeoutException as exc:
            error: ImageFetchError = _RetryableFetchError(
                url, f"timed out after {limits.timeout_s:g} s"
            )
            error.__cause__ = exc
        except httpx.TransportError as exc:
            error = _RetryableFetchError(url, f"connection failed ({type(exc).__name__}: {exc})")
            error.__cause__ = exc
        except _RetryableFetchError as exc:
            error = exc
        if attempt < limits.retries:
            time.sleep(limits.backoff_s * 2**attempt)
    raise ImageFetchError(error.url, error.reason) from error


def _new_client(limits: FetchLimits) -> httpx.Client:
    # trust_env=False: a proxy from the environment would undo the address pinning
    return httpx.Client(
        timeout=httpx.Timeout(limits.timeout_s),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": _USER_AGENT},
    )


def _fetch_bytes(url: str, limits: FetchLimits, client: httpx.Client | None) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _decode_data_uri(url, limits)
    if scheme not in ("http", "https"):
        shown = scheme or "(none)"
        raise ImageFetchError(url, f"scheme {shown!r} is not allowed (use http, https or data:)")
    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL as exc:
        raise ImageFetchError(url, f"invalid URL ({exc})") from exc
    if not host:
        raise ImageFetchError(url, "URL has no host")
    if client is not None:
        return _download(url, limits, client)
    with _new_client(limits) as own_client:
        return _download(url, limits, own_client)


def _write_atomic(dest: Path, data: bytes) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch_image(
    url: str,
    dest: Path,
    limits: FetchLimits,
    read_own: ReadOwn | None = None,
    client: httpx.Client | None = None,
) -> Path:
    """Fetch one image and write it to ``dest`` with the extension of its sniffed format.

    ``read_own`` is asked first: if it returns bytes (a dreamflow link read straight from
    storage), they are used instead of a download. Raises :class:`ImageFetchError`.
    """
    data = read_own(url) if read_own is not None else None
    if data is None:
        data = _fetch_bytes(url, limits, client)
    else:
        _check_size(url, len(data), limits)
    ext = _check_image(url, data[:_SNIFF_BYTES])
    return _write_atomic(dest.with_suffix(ext), data)


def fetch_images(
    urls: Sequence[str],
    dest_dir: Path,
    limits: FetchLimits,
    read_own: ReadOwn | None = None,
    max_workers: int = 4,
) -> tuple[list[Path], list[ImageFetchError]]:
    """Fetch ``urls`` concurrently into ``dest_dir`` as 00.<ext>, 01.<ext>, ...

    Returns the saved paths in the order of ``urls`` (failed ones skipped) and one error per
    failed URL, also in order.
    """
    width = max(2, len(str(max(len(urls) - 1, 0))))

    def fetch_one(index: int) -> Path | ImageFetchError:
        try:
            return fetch_image(urls[index], dest_dir / f"{index:0{width}d}", limits, read_own)
        except ImageFetchError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        results = list(pool.map(fetch_one, range(len(urls))))
    paths = [r for r in results if isinstance(r, Path)]
    errors = [r for r in results if isinstance(r, ImageFetchError)]
    return paths, errors
