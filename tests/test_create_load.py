"""200 concurrent creates against the queue limit, through the load benchmark's own code (real stack).

A second facade process is started on the session's Prefect server and store with a low
``DREAMFLOW_MAX_QUEUED``; the pool is paused meanwhile so nothing it accepts trains, and everything
it accepted is cancelled afterwards (``runguard``). No timing is asserted; ``bench/bench_create_load.py``
records the figures on a stack of its own.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

from deployments.stack import PROJECT_DIR, bin_path, free_ports, stack_env, wait_http
from runguard import active_trainings, pool_paused
from stackserver import KEYS, RunningStack

BENCH = Path(__file__).resolve().parents[1] / "bench"
REQUESTS = 200
ACCEPT = 20


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        import bench_create_load

        return bench_create_load
    finally:
        sys.path.remove(str(BENCH))


@contextmanager
def limited_facade(stack: RunningStack, limit: int, log_dir: Path, **settings_changes: object) -> Iterator[str]:
    """One more facade of the stack, with ``max_queued=limit``; its base URL."""
    port = free_ports(1)[0]
    settings = stack.settings.model_copy(update={"api_port": port, "max_queued": limit, **settings_changes})
    with (log_dir / "limited-facade.log").open("ab") as log:
        process = subprocess.Popen(
            [bin_path("uvicorn"), "api.app:create_app", "--factory", "--host", "127.0.0.1", "--port", str(port),
             "--no-access-log"],
            env=stack_env(settings, KEYS[0]), cwd=PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/docs", 60, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_200_concurrent_creates_get_201_up_to_the_limit_then_429(
    stack: RunningStack, bench: ModuleType, tmp_path: Path
) -> None:
    with pool_paused(stack) as active_before:
        limit = len(active_before) + ACCEPT
        with limited_facade(stack, limit, tmp_path) as url:
            outcomes, wall_s = asyncio.run(bench.send_creates(url, KEYS[0], REQUESTS))
        summary = bench.summarize(outcomes, wall_s)
        assert bench.problems(outcomes) == [], summary
        accepted = [o.training_id for o in outcomes if o.status == 201]
        others_now = len(active_trainings(stack)) - len(accepted)
        assert len(accepted) + others_now <= limit <= len(accepted) + len(active_before), summary
        runs = bench.flow_runs_named(stack.settings.prefect_api, accepted)
        assert set(runs) == set(accepted), "an accepted training has no flow run"
        assert set(runs.values()) == {"SCHEDULED"}
    assert {run["id"] for run in active_trainings(stack)} <= active_before  # everything it accepted is cancelled


def test_one_key_cannot_take_every_place_in_the_queue(stack: RunningStack, tmp_path: Path) -> None:
    import httpx

    from flows.settings import hash_key
    from stackserver import data_uri
    from tasks.sample_photos import write_sample_photos

    photo = write_sample_photos(tmp_path / "photos", count=1)[0]
    body = {"instance_prompt": "photo of sks person", "base_model_id": "tiny", "max_train_steps": "5",
            "images": [data_uri(photo)]}
    with pool_paused(stack) as active_before:
        owners = [tag for run in active_trainings(stack) for tag in run["tags"] if tag.startswith("owner:")]
        share = max(owners.count(f"owner:{hash_key(key)}") for key in KEYS) + 2
        with limited_facade(stack, len(active_before) + 10, tmp_path, max_queued_per_key=share) as url:
            def create(key: str) -> httpx.Response:
                return httpx.post(f"{url}/api/v3/lora_fine_tune", json={**body, "key": key}, timeout=60)

            alice = [create(KEYS[0]) for _ in range(share - owners.count(f"owner:{hash_key(KEYS[0])}") + 1)]
            bob = create(KEYS[1])
    assert [r.status_code for r in alice] == [201] * (len(alice) - 1) + [429], [r.text for r in alice]
    assert "of this API key" in alice[-1].json()["messege"] and alice[-1].headers["Retry-After"]
    assert bob.status_code == 201, bob.text  # the other key still gets its place
