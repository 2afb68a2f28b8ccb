"""The real dreamflow stack for tests, started the way ``dreamflow up`` starts it."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from deployments.stack import Stack, start_stack
from flows.settings import Settings
from flows.store import S3Store
from s3server import WeedS3Server, free_ports

KEYS = ("test-key-alice", "test-key-bob")
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"dreamflow-test-webhook-secret-32b").decode()
TERMINAL = {"model_ready", "failed", "cancelled"}


@dataclass
class RunningStack:
    settings: Settings
    stack: Stack
    store: S3Store

    @classmethod
    def start(cls, s3: WeedS3Server, data_dir: Path) -> RunningStack:
        api_port, prefect_port = free_ports(2)
        settings = Settings(
            api_keys=",".join(KEYS), data_dir=data_dir, api_port=api_port, prefect_port=prefect_port,
            storage="s3", s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key,
            s3_bucket="dreamflow-e2e", allow_private_networks=True, work_pool="dreamflow-test",
            webhook_secret=WEBHOOK_SECRET, sandbox_steps=10, checkpoint_every=25,
        )
        stack = start_stack(settings)
        store = S3Store(endpoint=s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key,
                        bucket="dreamflow-e2e")
        return cls(settings, stack, store)

    def stop(self) -> None:
        self.stack.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.api_port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)

    def flow_run_count(self) -> int:
        """Flow runs the Prefect server knows, straight from its REST API."""
        response = httpx.post(f"{self.settings.prefect_api}/flow_runs/count", json={}, timeout=10)
        response.raise_for_status()
        return int(response.json())

    def artifacts(self, training_id: str) -> list[dict]:
        """The Prefect artifacts of a training's flow run (what the UI shows on the run's page)."""
        run_id = self.flow_run(training_id)["id"]
        response = httpx.post(f"{self.settings.prefect_api}/artifacts/filter", timeout=10,
                              json={"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        response.raise_for_status()
        return response.json()

    def flow_run(self, training_id: str) -> dict:
        """A training's flow run as the Prefect server's REST API describes it."""
        response = httpx.post(f"{self.settings.prefect_api}/flow_runs/filter", timeout=10,
                              json={"flow_runs": {"name": {"any_": [training_id]}}, "limit": 1})
        response.raise_for_status()
        return response.json()[0]

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
