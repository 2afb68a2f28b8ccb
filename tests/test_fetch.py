"""tasks.fetching against a real HTTP server on loopback.

Most tests reach the server with ``FetchLimits(allow_private=True)``; the SSRF tests use the
default limits and assert that nothing reached the server. Where a public host name is needed
without internet, only name resolution (``resolve_host``) is faked; the HTTP traffic is real.
"""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tasks import fetching
from tasks.fetching import FetchLimits, ImageFetchError, fetch_image, fetch_images

BIG_TOTAL = 50 * 1024 * 1024
LOCAL = FetchLimits(allow_private=True, backoff_s=0.01, timeout_s=5.0)


def png_bytes(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()


@dataclass
class Recorder:
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Host header)
    flaky_calls: int = 0
    big_bytes_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


class Handler(BaseHTTPRequestHandler):
    recorder: Recorder
    port: int

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def send_body(self, body: bytes, status: int = 200, ctype: str = "image/png") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        rec = self.recorder
        with rec.lock:
            rec.requests.append((self.path, self.headers.get("Host", "")))
        path = self.path
        if path == "/img.png":
            self.send_body(PNG, ctype="text/html")  # wrong type on purpose: content decides
        elif path == "/notimage":
            self.send_body(b"<html><body>hello</body></html>", ctype="image/png")
        elif path == "/big":
            self.stream_big()
        elif path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(BIG_TOTAL))
            self.end_headers()
            self.wfile.write(PNG)
        elif path == "/slow":
            time.sleep(3)
            self.send_body(PNG)
        elif path == "/flaky":
            with rec.lock:
                rec.flaky_calls += 1
                first = rec.flaky_calls == 1
            if first:
                self.send_body(b"oops", status=500, ctype="text/plain")
            else:
                self.send_body(PNG)
        elif path.startswith("/redirect/"):
            left = int(path.rsplit("/", 1)[1])
            self.redirect(f"/redirect/{left - 1}") if left > 0 else self.send_body(PNG)
        elif path == "/to-loopback":
            self.redirect(f"http://127.0.0.1:{self.port}/img.png")
        else:
            self.send_body(b"not found", status=404, ctype="text/plain")

    def stream_big(self) -> None:
        """Send a PNG header then zeros with no Content-Length, counting what was written."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        chunk = b"\0" * 65536
        try:
            self.wfile.write(PNG[:16])
            while self.recorder.big_bytes_sent < BIG_TOTAL:
                self.wfile.write(chunk)
                self.recorder.big_bytes_sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass


@dataclass
class Server:
    port: int
    recorder: Recorder

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@contextlib.contextmanager
def running_server(tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    recorder = Recorder()
    handler = type("BoundHandler", (Handler,), {"recorder": recorder})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    handler.port = httpd.server_address[1]
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield Server(port=httpd.server_address[1], recorder=recorder)
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    with running_server() as running:
        yield running


def fake_public_name(
    monkeypatch: pytest.MonkeyPatch, name: str, to: str = "127.0.0.1"
) -> list[str]:
    """Make ``name`` resolve to ``to``; everything else resolves for real. Returns the lookups."""
    real = fetching.resolve_host
    lookups: list[str] = []

    def resolve(host: str, port: int) -> list[fetching.IPAddress]:
        lookups.append(host)
        return [ipaddress.ip_address(to)] if host == name else real(host, port)

    monkeypatch.setattr(fetching, "resolve_host", resolve)
    return lookups


# --- fetching that works ---------------------------------------------------------------


def test_png_is_saved_with_sniffed_extension(server: Server, tmp_path: Path) -> None:
    path = fetch_image(server.url("/img.png"), tmp_path / "00", LOCAL)
    assert path == tmp_path / "00.png"
    assert path.read_bytes() == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["00.png"]  # no temp files left


def test_data_uri(tmp_path: Path) -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    path = fetch_image(uri, tmp_path / "a", FetchLimits())
    assert path.suffix == ".png" and path.read_bytes() == PNG


def test_read_own_is_used_before_any_download(server: Server, tmp_path: Path) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    own_url = server.url("/models/m1/images/0")
    path = fetch_image(own_url, tmp_path / "x", FetchLimits(), read_own=lambda u: jpeg.getvalue())
    assert path.suffix == ".jpg"
    assert server.recorder.requests == []


def test_connection_is_pinned_to_the_checked_address_with_original_host(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups = fake_public_name(monkeypatch, "images.example.test")
    fetch_image(server.url("/img.png", host="images.example.test"), tmp_path / "a", LOCAL)
    assert server.recorder.requests == [("/img.png", f"images.example.test:{server.port}")]
    assert lookups == ["images.example.test"]  # resolved once: no second lookup to rebind


def self_signed_cert(directory: Path, name: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize(
    ("cert_name", "ok"), [("images.example.test", True), ("other.example.test", False)]
)
def test_https_is_pinned_with_sni_and_the_certificate_checked_against_the_name(
    cert_name: str, ok: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real TLS to loopback; only the name resolution of images.example.test is faked.
    cert, key = self_signed_cert(tmp_path, cert_name)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    fake_public_name(monkeypatch, "images.example.test")
    limits = FetchLimits(allow_private=True, retries=0, timeout_s=5.0)
    trusting = ssl.create_default_context(cafile=str(cert))
    with running_server(tls) as https, httpx.Client(verify=trusting, trust_env=False) as client:
        url = f"https://images.example.test:{https.port}/img.png"
        if ok:
            assert fetch_image(url, tmp_path / "a", limits, client=client).read_bytes() == PNG
            assert https.recorder.requests == [("/img.png", f"images.example.test:{https.port}")]
        else:
            with pytest.raises(ImageFetchError, match="certificate verify failed"):
                fetch_image(url, tmp_path / "a", limits, client=client)


# --- clear errors ------------------------------------------------------------------------


def test_not_an_image(server: Server, tmp_path: Path) -> None:
    with pytest.raises(ImageFetchError, match=r"not an image \(content starts with b'<html>"):
        fetch_image(server.url("/notimage"), tmp_path / "a", LOCAL)
    assert list(tmp_path.iterdir()) == []


def test_too_large_stops_the_download_early(server: Server, tmp_path: Path) -> None:
    limits = FetchLimits(allow_private=True, max_bytes=1024 * 1024)
    with pytest.raises(ImageFetchError, match="download larger than 1 MB"):
        fetch_image(server.url("/big"), tmp_path / "a", limits)
    time.sleep(0.2)  # let the server notice the closed connection
    assert server.recorder.big_bytes_sent < BIG_TOTAL / 2


def test_declared_content_length_over_limit_is_refused(server: Server, tmp_path: Path) -> None:
    limits = FetchLimits(allow_private=True, max_bytes=1024 * 1024)
    with pytest.raises(ImageFetchError, match="download larger than 1 MB"):
        fetch_image(server.url("/big-declared"), tmp_path / "a", limits)


def test_slow_server_times_out_quickly(server: Server, tmp_path: Path) -> None:
    limits = FetchLimits(allow_private=True, timeout_s=0.3, retries=0)
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match=r"timed out after 0.3 s"):
        fetch_image(server.url("/slow"), tmp_path / "a", limits)
    assert time.monotonic() - start < 2


def test_server_error_is_retried(server: Server, tmp_path: Path) -> None:
    path = fetch_image(server.url("/flaky"), tmp_path / "a", LOCAL)
    assert path.read_bytes() == PNG
    assert server.recorder.paths() == ["/flaky", "/flaky"]


def test_404_is_not_retried(server: Server, tmp_path: Path) -> None:
    with pytest.raises(ImageFetchError, match="HTTP 404") as info:
        fetch_image(server.url("/missing"), tmp_path / "a", LOCAL)
    assert info.value.reason == "HTTP 404"
    assert str(info.value) == f"{server.url('/missing')}: HTTP 404"
    assert server.recorder.paths() == ["/missing"]


def test_redirects_are_followed_up_to_the_limit(server: Server, tmp_path: Path) -> None:
    fetch_image(server.url("/redirect/3"), tmp_path / "a", LOCAL)  # 3 redirects: allowed
    with pytest.raises(ImageFetchError, match="more than 3 redirects"):
        fetch_image(server.url("/redirect/4"), tmp_path / "b", LOCAL)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "/relative.png"]
)
def test_other_schemes_are_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(ImageFetchError, match="is not allowed"):
        fetch_image(url, tmp_path / "a", FetchLimits())


def test_data_uri_errors_are_redacted(tmp_path: Path) -> None:
    uri = "data:image/png;base64," + base64.b64encode(b"just some text, no image" * 10).decode()
    with pytest.raises(ImageFetchError) as info:
        fetch_image(uri, tmp_path / "a", FetchLimits())
    assert info.value.url == "data:image/png;base64,…(240 bytes)"
    assert info.value.reason.startswith("not an image")


# --- SSRF ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url_template",
    [
        "http://127.0.0.1:{port}/img.png",
        "http://localhost:{port}/img.png",  # a name that resolves to loopback
        "http://2130706433:{port}/img.png",  # 127.0.0.1 written as one number
        "http://[::ffff:127.0.0.1]:{port}/img.png",  # IPv4-mapped IPv6
        "http://10.0.0.1/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:{port}/img.png",
        "http://0.0.0.0:{port}/img.png",
    ],
)
def test_private_addresses_are_refused_before_any_request(
    url_template: str, server: Server, tmp_path: Path
) -> None:
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match="not allowed"):
        fetch_image(url_template.format(port=server.port), tmp_path / "a", FetchLimits())
    assert time.monotonic() - start < 1  # refused, not timed out trying to connect
    assert server.recorder.requests == []


def test_redirect_to_loopback_is_refused_at_that_hop(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only resolution and the address check of the first hop are faked: "public.example.test"
    # stands for a public server (it is really this loopback server). The second hop, to
    # 127.0.0.1, goes through the real check.
    fake_public_name(monkeypatch, "public.example.test")
    real_check = fetching.is_allowed_address
    first_hop = iter([True])

    def allow_first_hop(ip: fetching.IPAddress) -> bool:
        return next(first_hop, False) or real_check(ip)

    monkeypatch.setattr(fetching, "is_allowed_address", allow_first_hop)
    with pytest.raises(ImageFetchError, match="address 127.0.0.1 is private"):
        url = server.url("/to-loopback", host="public.example.test")
        fetch_image(url, tmp_path / "a", FetchLimits())
    assert server.recorder.paths() == ["/to-loopback"]  # /img.png was never requested


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.215.14", True),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:169.254.169.254", False),
        ("::ffff:8.8.8.8", True),
        ("2002:7f00:1::", False),  # 6to4 wrapping 127.0.0.1
    ],
)
def test_is_allowed_address(address: str, allowed: bool) -> None:
    assert fetching.is_allowed_address(ipaddress.ip_address(address)) is allowed


# --- many at once -------------------------------------------------------------------------


def test_fetch_images_keeps_order_and_reports_errors(server: Server, tmp_path: Path) -> None:
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes((0, 0, 255))).decode()
    urls = [server.url("/img.png"), server.url("/missing"), data_uri, server.url("/notimage")]
    paths, errors = fetch_images(urls, tmp_path, LOCAL, max_workers=4)
    assert [p.name for p in paths] == ["00.png", "02.png"]
    assert paths[0].read_bytes() == PNG
    assert Image.open(paths[1]).getpixel((0, 0)) == (0, 0, 255)
    assert [(e.url, e.reason.split(" (")[0]) for e in errors] == [
        (urls[1], "HTTP 404"),
        (urls[3], "not an image"),
    ]


def test_links_to_the_store_are_read_directly_only_for_the_owners_uploads_and_the_trainings_inputs(
    tmp_path: Path,
) -> None:
    """An unsigned link to another owner's upload, or to an operator's dataset, is not read straight
    from storage (a second API key trained on both once); it is fetched like any URL instead, so the
    store's own signature check and the private-address check apply. ``store:`` references, which
    only the UI, schedules and the facade's stored inputs carry, keep their wider reach."""
    from flows.store_local import LocalStore
    from tasks.fetch import own_reader

    store = LocalStore(tmp_path / "store", "http://facade.test", b"secret")
    keys = ["uploads/alice/1.png", "uploads/bob/2.png", "datasets/private/3.png", "trainings/t1/inputs/00.png"]
    for key in keys:
        store.put_bytes(key, key.encode())
    read = own_reader(store, "t1", "alice")
    links = {key: read(f"http://facade.test/files/{key}") for key in keys}
    references = {key: read(f"store:{key}") for key in keys}
    assert links == {"uploads/alice/1.png": b"uploads/alice/1.png", "uploads/bob/2.png": None,
                     "datasets/private/3.png": None, "trainings/t1/inputs/00.png": b"trainings/t1/inputs/00.png"}
    assert references == {key: key.encode() for key in keys}
    assert read("https://elsewhere.test/files/uploads/alice/1.png") is None  # not this store's link at all
