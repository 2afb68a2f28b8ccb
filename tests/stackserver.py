"""The real dreamflow stack for tests, started the way ``dreamflow up`` starts it."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from s3server import WeedS3Server, free_ports

from deployments.prefect_server import server_command
from deployments.stack import Stack, start_stack, wait_http
from flows.settings import Settings
from flows.store_s3 import S3Store

PREFECT_TRIES = 5


def prefect_request(method: str, url: str, json: dict) -> httpx.Response:
    """One Prefect REST call, tried again on 503: its SQLite answers "database is locked" under bursts."""
    for attempt in range(PREFECT_TRIES):
        response = httpx.request(method, url, json=json, timeout=30)
        if response.status_code != 503 or attempt == PREFECT_TRIES - 1:
            response.raise_for_status()
            return response
        time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


KEYS = ("test-key-alice", "test-key-bob")
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"dreamflow-test-webhook-secret-32b").decode()
TERMINAL = {"model_ready", "failed", "cancelled"}


@dataclass
class RunningStack:
    settings: Settings
    stack: Stack
    store: S3Store

    @classmethod
    def start(cls, s3: WeedS3Server, data_dir: Path, **overrides: object) -> RunningStack:
        """Start a stack on ``s3``; ``overrides`` change its settings (e.g. ``test_stage_hold=True``)."""
        api_port, prefect_port = free_ports(2)
        values: dict[str, object] = dict(
            api_keys=",".join(KEYS), data_dir=data_dir, api_port=api_port, prefect_port=prefect_port,
            storage="s3", s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key,
            s3_bucket="dreamflow-e2e", allow_private_networks=True, work_pool="dreamflow-test",
            webhook_secret=WEBHOOK_SECRET, sandbox_steps=10, checkpoint_every=25,
        )
        settings = Settings(**{**values, **overrides})
        stack = start_stack(settings)
        store = S3Store(endpoint=s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key,
                        bucket="dreamflow-e2e")
        return cls(settings, stack, store)

    def stop(self) -> None:
        self.stack.stop()

    # ------------------------------------------------------------------ faults

    def stop_prefect_server(self) -> None:
        """Stop the Prefect server (SIGTERM, then SIGKILL); worker, flow runs and facade keep running."""
        for entry in [e for e in self.stack.processes if e[0] == "prefect-server"]:
            _, proc = entry
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(15)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            self.stack.processes.remove(entry)

    def start_prefect_server(self) -> None:
        """Start the Prefect server again on the same port, home and database; wait until it answers."""
        server = self.stack.spawn("prefect-server", server_command(self.settings.prefect_port))
        self.stack.processes.insert(0, self.stack.processes.pop())  # stopped last, as at start
        wait_http(f"{self.settings.prefect_api}/health", 120, server)

    def hold_marker(self, stage: str) -> Path:
        """The file that holds trainings at ``stage`` while it exists (needs ``test_stage_hold=True``)."""
        return self.settings.resolved_data_dir / "test-stage-hold" / stage

    def hold(self, stage: str) -> Path:
        marker = self.hold_marker(stage)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return marker

    def release(self, stage: str) -> None:
        self.hold_marker(stage).unlink(missing_ok=True)

    def set_pool_paused(self, paused: bool) -> None:
        """Pause or resume the work pool: a paused pool hands no runs to its workers."""
        prefect_request("PATCH", f"{self.settings.prefect_api}/work_pools/{self.settings.work_pool}",
                        {"is_paused": paused})

    def status(self, training_id: str, key: str = KEYS[0]) -> httpx.Response:
        """One status request to the facade, whatever it answers."""
        with self.client() as client:
            return client.post(f"/api/v3/fine_tune_status/{training_id}", json={"key": key})

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.api_port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)

    def flow_run_count(self) -> int:
        """Flow runs the Prefect server knows, straight from its REST API."""
        return int(prefect_request("POST", f"{self.settings.prefect_api}/flow_runs/count", {}).json())

    def artifacts(self, training_id: str) -> list[dict]:
        """The Prefect artifacts of a training's flow run (what the UI shows on the run's page)."""
        run_id = self.flow_run(training_id)["id"]
        return prefect_request("POST", f"{self.settings.prefect_api}/artifacts/filter",
                               {"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()

    def flow_run(self, training_id: str) -> dict:
        """A training's flow run as the Prefect server's REST API describes it."""
        return prefect_request("POST", f"{self.settings.prefect_api}/flow_runs/filter",
                               {"flow_runs": {"name": {"any_": [training_id]}}, "limit": 1}).json()[0]

    def wait_until_done(self, training_id: str, key: str, timeout_s: float = 300,
                        until: set[str] = TERMINAL) -> tuple[dict, list[str]]:
        """Poll the status endpoint until one of ``until``; returns the status and every status seen."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while time.monotonic() < deadline:
                body = client.post(f"/api/v3/fine_tune_status/{training_id}", json={"key": key}).json()
                if not seen or seen[-1] != body["training_status"]:
                    seen.append(body["training_status"])
                if body["training_status"] in until | TERMINAL:
                    return body, seen
                time.sleep(0.25)
        raise AssertionError(f"{training_id} not done after {timeout_s} s; statuses {seen}; logs in {self.stack.log_dir}")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
