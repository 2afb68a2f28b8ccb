"""The facade's gateway against the stack's real Prefect server: a create that the server (SQLite)
answers 503 again and again while another writer keeps committing is asked again until the call's
time bound and queues exactly one run; a cancel or delete that saw a run still running (the status
cache may be up to 1 s old) leaves a run that has ended meanwhile in its final state; and against a
server with basic auth, the clients dreamflow builds itself send the configured credentials."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from prefect import flow
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import StateType
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Running

from api.gateway import CALL_TIMEOUT_S, PrefectGateway, TrainingRun
from api.routes import DEPLOYMENTS
from deployments.pool import prepare_orchestration
from deployments.stack import bin_path, free_ports, wait_http
from flows.params import TrainingParams
from flows.settings import GPU_CONCURRENCY_LIMIT, hash_key
from sqlitelock import keep_writing
from stackserver import KEYS, RunningStack
from tasks import gpuslot
from tasks.sample_photos import write_sample_photos

BUSY_S = 6.0  # how long the other writer keeps the database busy: longer than a client pausing 2 s per 503
# would outlast in three tries, inside CALL_TIMEOUT_S
HOLD_S = 0.25
AUTH = "dreamflow-admin:not-a-real-secret"


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


@flow(name="gateway-test-run")
def a_run_without_deployment() -> None:
    """Never runs: the tests below only create flow runs of it and set their states."""


def test_a_cancel_that_saw_a_run_still_running_leaves_an_ended_run_as_it_ended(stack: RunningStack) -> None:
    owner = hash_key(KEYS[0])

    async def cancel_as_seen_running(final: bool) -> tuple[bool, StateType | None]:
        # Prefect's own client (with its retries) sets the scene; the gateway's sends each request once.
        async with PrefectGateway(stack.settings.prefect_api) as gateway, PrefectClient(stack.settings.prefect_api) as client:
            created = await client.create_flow_run(a_run_without_deployment, name=f"race{uuid.uuid4().hex[:8]}",
                                                   state=Running())
            if final:  # the run ended after the facade last read it
                await client.set_flow_run_state(created.id, Completed(), force=True)
            seen = TrainingRun(created.name, created.id, StateType.RUNNING, None, created.created, {})
            started = await gateway.cancel_training(seen, owner)
            return started, (await client.read_flow_run(created.id)).state.type

    # Deleting a model the moment it became ready: the run stays Completed (before, it was forced to
    # Cancelling, stayed so for good, and the cleanup waited 5 min for it to end).
    assert asyncio.run(cancel_as_seen_running(final=True)) == (True, StateType.COMPLETED)
    # A run that is still running is asked to stop.
    assert asyncio.run(cancel_as_seen_running(final=False)) == (True, StateType.CANCELLING)


@pytest.fixture
def prefect_with_basic_auth(tmp_path: Path) -> Iterator[str]:
    """A Prefect server of its own that asks every API request for ``AUTH`` (basic auth); its API URL."""
    port = free_ports(1)[0]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_API_AUTH_STRING": AUTH,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    proc = subprocess.Popen([bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                             "--no-ui"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{api}/health", 90, proc)
        yield api
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_facade_and_the_pool_setup_log_in_to_a_prefect_server_with_basic_auth(prefect_with_basic_auth: str) -> None:
    api = prefect_with_basic_auth

    async def count() -> int:
        async with PrefectGateway(api) as gateway:
            return await gateway.count_active_trainings()

    with temporary_settings({PREFECT_API_AUTH_STRING: AUTH}):
        prepare_orchestration(api, "auth-test-pool", 1)  # what `dreamflow up` does against an existing server
        assert asyncio.run(count()) == 0
        # the GPU slot's client: the limit the pool setup created is there, and one slot is taken and freed
        with temporary_settings({PREFECT_API_URL: api}), gpuslot.gpu_slot(GPU_CONCURRENCY_LIMIT, 60):
            pass
    with pytest.raises(PrefectHTTPStatusError, match="401"):  # the same server refuses a client without them
        asyncio.run(count())
