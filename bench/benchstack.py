"""The whole dreamflow stack for the stack benchmarks: started as ``dreamflow up`` starts it.

Local storage, free loopback ports, a fresh data folder, one process worker; the caller stops it.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

import httpx

from deployments.stack import Stack, start_stack
from flows.settings import Settings
from deployments.stack import free_ports

KEY = "bench-key"
TERMINAL = {"model_ready", "failed", "cancelled"}


def start_bench_stack(data_dir: Path, workers: int = 1, **overrides: Any) -> tuple[Settings, Stack]:
    """Prefect server + work pool + deployments + ``workers`` process workers + facade, on local storage."""
    api_port, prefect_port = free_ports(2)
    settings = Settings(api_keys=KEY, data_dir=data_dir, api_port=api_port, prefect_port=prefect_port,
                        storage="local", work_pool="dreamflow-bench", **overrides)
    return settings, start_stack(settings, workers)


def base_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.api_port}"


def jpeg_data_uri(path: Path, side: int | None = None) -> str:
    """A photo as a JPEG data URI, optionally resized to ``side`` x ``side`` first."""
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if side is not None:
        image = image.resize((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def create_sandbox(client: httpx.Client, images: list[str]) -> str:
    """POST /api/sandbox/v3/fine_tune; the new training id."""
    response = client.post("/api/sandbox/v3/fine_tune", json={
        "key": KEY, "instance_prompt": "photo of sks person", "class_prompt": "photo of person",
        "images": images, "seed": "0", "training_type": "null", "webhook": None,
    })
    if response.status_code != 201:
        raise RuntimeError(f"sandbox create answered {response.status_code}: {response.text[:500]}")
    return str(response.json()["training_id"])


def wait_until_done(client: httpx.Client, training_id: str, timeout_s: float, poll_s: float = 0.25) -> dict:
    """Poll the status endpoint until the training ends; its last status body."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.post(f"/api/v3/fine_tune_status/{training_id}", json={"key": KEY}).json()
        if body.get("training_status") in TERMINAL:
            return body
        time.sleep(poll_s)
    raise TimeoutError(f"training {training_id} not done after {timeout_s:.0f} s")


def flow_run(settings: Settings, training_id: str) -> dict:
    """The training's flow run as the Prefect REST API describes it."""
    response = httpx.post(f"{settings.prefect_api}/flow_runs/filter", timeout=10,
                          json={"flow_runs": {"name": {"any_": [training_id]}}, "limit": 1})
    response.raise_for_status()
    runs = response.json()
    if not runs:
        raise LookupError(f"no flow run named {training_id}")
    return runs[0]
