"""Prefect or storage unreachable: the facade answers 503 with a clear message and starts nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deployments.stack import wait_http
from hostile_inputs import data_uri, small_jpeg
from s3server import free_ports
from stackserver import RunningStack

KEY = "unavailable-test-key"
PHOTO = data_uri(small_jpeg(64), "image/jpeg")  # the smallest image the facade accepts


def start_facade(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_ports(1)[0]
    full_env = {**os.environ, "DREAMFLOW_API_KEYS": KEY, "DREAMFLOW_DATA_DIR": str(tmp_path), **env}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "uvicorn"), "api.app:create_app", "--factory", "--port", str(port)],
        env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/docs", 60, proc)
    return proc, base


@pytest.fixture
def facade_without_prefect(tmp_path: Path) -> Iterator[str]:
    closed = free_ports(1)[0]
    proc, base = start_facade(tmp_path, DREAMFLOW_PREFECT_API_URL=f"http://127.0.0.1:{closed}/api")
    yield base
    proc.terminate()
    proc.wait(10)


def test_prefect_unreachable_is_503_and_nothing_is_stored(facade_without_prefect: str, tmp_path: Path) -> None:
    with httpx.Client(base_url=facade_without_prefect, timeout=60) as client:
        listed = client.post("/api/v3/finetune_list", json={"key": KEY})
        created = client.post("/api/v3/lora_fine_tune", json={
            "key": KEY, "instance_prompt": "photo of sks person", "base_model_id": "tiny", "images": [PHOTO]})
    for response in (listed, created):
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["status"] == "error" and "orchestrator (Prefect) is unreachable" in body["messege"]
    assert not list((tmp_path / "storage").rglob("*.png"))  # the inline image was not left behind


def test_storage_unreachable_is_503(stack: RunningStack, tmp_path: Path) -> None:
    closed = free_ports(1)[0]
    proc, base = start_facade(
        tmp_path, DREAMFLOW_PREFECT_API_URL=stack.settings.prefect_api, DREAMFLOW_STORAGE="s3",
        DREAMFLOW_S3_ENDPOINT=f"127.0.0.1:{closed}", DREAMFLOW_S3_ACCESS_KEY="x", DREAMFLOW_S3_SECRET_KEY="y",
    )
    try:
        before = stack.flow_run_count()
        with httpx.Client(base_url=base, timeout=60) as client:
            created = client.post("/api/v3/lora_fine_tune", json={
                "key": KEY, "instance_prompt": "photo of sks person", "base_model_id": "tiny", "images": [PHOTO]})
        assert created.status_code == 503, created.text
        assert "storage is unreachable" in created.json()["messege"]
        assert stack.flow_run_count() == before
    finally:
        proc.terminate()
        proc.wait(10)
