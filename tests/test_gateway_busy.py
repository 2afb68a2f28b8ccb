"""The facade's calls to a busy Prefect: the stack's real server on SQLite answers a create 503 again
and again while another writer keeps committing; the facade's gateway asks again until its time
bound and queues exactly one run."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import httpx

from api.gateway import CALL_TIMEOUT_S, PrefectGateway, TrainingRun
from api.routes import DEPLOYMENTS
from flows.params import TrainingParams
from flows.settings import hash_key
from sqlitelock import keep_writing
from stackserver import KEYS, RunningStack
from tasks.sample_photos import write_sample_photos

BUSY_S = 6.0  # how long the other writer keeps the database busy: longer than a client pausing 2 s per 503
# would outlast in three tries, inside CALL_TIMEOUT_S
HOLD_S = 0.25


def test_a_create_answered_503_many_times_in_a_row_still_queues_one_run(stack: RunningStack, tmp_path: Path) -> None:
    photo = write_sample_photos(tmp_path, count=1)[0]
    upload_key = f"uploads/busy-{uuid.uuid4().hex[:8]}/{photo.name}"
    stack.store.put_file(upload_key, photo)
    params = TrainingParams(training_id=f"busy{uuid.uuid4().hex[:8]}", owner=hash_key(KEYS[0]),
                            instance_prompt="photo of sks person", images=[f"store:{upload_key}"],
                            max_train_steps=5, sample_count=1)
    statuses: list[int] = []

    async def seen(response: httpx.Response) -> None:
        if response.request.url.path.endswith("/create_flow_run"):
            statuses.append(response.status_code)

    async def create() -> tuple[TrainingRun, float, TrainingRun | None]:
        async with PrefectGateway(stack.settings.prefect_api) as gateway:
            await gateway._deployment_id(DEPLOYMENTS["lora"])  # resolved before the database gets busy
            gateway._client._client.event_hooks["response"].append(seen)
            stop = threading.Event()
            writer = keep_writing(stack, "UPDATE deployment SET updated = updated WHERE name = ?", ("lora",),
                                  HOLD_S, stop)
            threading.Timer(BUSY_S, stop.set).start()
            started = time.monotonic()
            try:
                run = await gateway.start_training(DEPLOYMENTS["lora"], params, "busy-order")
            finally:
                stop.set()
                await asyncio.to_thread(writer.join)
            took = time.monotonic() - started
            return run, took, await gateway.find_by_idempotency_key(params.owner, "busy-order")

    run, took, found = asyncio.run(create())
    with stack.client() as client:
        client.post(f"/api/v3/cancel_training/{run.training_id}", json={"key": KEYS[0]})
    # Prefect refused the create several times while the other writer kept committing; the gateway
    # kept asking, within its bound, and the run that was queued is the one the key finds.
    assert statuses.count(503) >= 3 and statuses[-1] == 201, statuses
    assert took < CALL_TIMEOUT_S
    assert run.training_id == params.training_id and found is not None and found.flow_run_id == run.flow_run_id
