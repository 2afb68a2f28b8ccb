"""The stack's worker polls the moment its pool gets a scheduled run (real Prefect server, real
event stream, real process worker), and keeps polling on its own when the stream is gone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from datetime import UTC, datetime
from uuid import UUID

import pytest
from prefect.client.orchestration import PrefectClient
from prefect.events.schemas.events import Event, RelatedResource, Resource
from prefectruns import read_flow_run, state_history, wait_for_final
from stackserver import RunningStack

from deployments.stack import PROJECT_DIR, stack_env
from deployments.worker import WakingProcessWorker, poll_when_woken, remember_settings_environment, subscribe, wakes
from flows.settings import Settings

POLL_S = "60"  # the worker's own polls: far apart, so a run picked up within seconds was woken for


def scheduled(pool: str, state: str = "Scheduled", state_type: str = "SCHEDULED") -> Event:
    """A flow-run state change as the server announces it (prefect/server/models/events.py)."""
    run_id = uuid.uuid4()
    return Event(
        occurred=datetime.now(UTC), event=f"prefect.flow-run.{state}",
        resource=Resource({"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.state-name": state,
                           "prefect.state-type": state_type}),
        related=[RelatedResource({"prefect.resource.id": f"prefect.work-pool.{uuid.uuid4()}",
                                  "prefect.resource.role": "work-pool", "prefect.resource.name": pool}),
                 RelatedResource({"prefect.resource.id": f"prefect.work-queue.{uuid.uuid4()}",
                                  "prefect.resource.role": "work-queue", "prefect.resource.name": pool})],
    )


def test_only_runs_scheduled_in_the_workers_own_pool_wake_it() -> None:
    assert wakes(scheduled("gpu"), "gpu")
    assert wakes(scheduled("gpu", "AwaitingRetry"), "gpu")  # to run again: a retry, a crashed run rescheduled
    assert not wakes(scheduled("other-pool"), "gpu")
    assert not wakes(scheduled("gpu", "Running", "RUNNING"), "gpu")
    assert not wakes(scheduled("gpu", "Pending", "PENDING"), "gpu")
    # a work queue named like the pool is not the pool
    event = scheduled("gpu")
    event.related = [r for r in event.related if r.role != "work-pool"]
    assert not wakes(event, "gpu")


def test_wake_ups_during_a_poll_make_one_more_poll_and_a_failed_poll_does_not_stop_them() -> None:
    polls: list[int] = []

    async def scenario() -> None:
        wake = asyncio.Event()
        first_poll_running = asyncio.Event()

        async def poll() -> None:
            polls.append(len(polls))
            first_poll_running.set()
            await asyncio.sleep(0.05)
            if len(polls) == 1:
                raise RuntimeError("the server answered 503")

        task = asyncio.create_task(poll_when_woken(wake, poll))
        wake.set()
        await first_poll_running.wait()
        for _ in range(3):  # three runs scheduled while the first poll is under way
            wake.set()
        await asyncio.sleep(0.3)
        task.cancel()

    asyncio.run(scenario())
    assert polls == [0, 1]


def test_an_unreachable_event_stream_is_subscribed_to_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    import deployments.worker as worker_module

    failures: list[str] = []
    monkeypatch.setattr(worker_module.log, "warning", lambda message, *args: failures.append(message % args))

    async def scenario() -> None:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # nothing listens there
            await asyncio.wait_for(subscribe("gpu", asyncio.Event(), resubscribe_s=0.01), timeout=3)

    with pytest.raises(TimeoutError):  # it kept trying instead of ending or raising
        asyncio.run(scenario())
    assert len(failures) >= 2 and "event stream unavailable" in failures[0], failures[:3]


def test_the_worker_takes_over_the_process_type_and_the_cli_finds_it() -> None:
    from prefect.cli._worker_utils import _load_worker_class

    assert WakingProcessWorker.type == "process"
    assert _load_worker_class("process") is WakingProcessWorker


@pytest.fixture
def pool_worker(stack: RunningStack) -> Iterator[str]:
    """A worker of a pool of its own that polls only every POLL_S seconds; the pool's name."""
    pool = f"wake-test-{uuid.uuid4().hex[:8]}"
    env = {**stack.stack.env, "PREFECT_WORKER_QUERY_SECONDS": POLL_S}
    log = stack.stack.log_dir / f"{pool}.log"
    with log.open("ab") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "deployments.worker", "--pool", pool, "--type", "process", "--name", pool],
            env=env, cwd=PROJECT_DIR, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "started!" not in log.read_text():
            assert worker.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # the worker's first poll (at its start) is over; events from before its
        # subscription are sent to it too (the stream starts a minute back)
        yield pool
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)


def noop_deployment_run(api_url: str, pool: str) -> UUID:
    async def create() -> UUID:
        async with PrefectClient(api_url) as client:
            flow_id = await client.create_flow_from_name("dreamflow-noop")
            deployment_id = await client.create_deployment(
                flow_id=flow_id, name=pool, work_pool_name=pool, entrypoint="tests/noopflow.py:noop",
                job_variables={"working_dir": str(PROJECT_DIR)})
            return (await client.create_flow_run_from_deployment(deployment_id)).id

    return asyncio.run(create())


def test_a_run_scheduled_in_the_pool_is_picked_up_at_once_not_at_the_next_poll(
        stack: RunningStack, pool_worker: str) -> None:
    api = stack.settings.prefect_api
    run_id = noop_deployment_run(api, pool_worker)
    created = read_flow_run(api, run_id).created
    run = wait_for_final(api, run_id, timeout_s=120)
    assert run.state is not None and run.state.type.value == "COMPLETED", run.state
    assert state_history(api, run_id)[:2] == ["Scheduled", "Pending"]

    async def pending_at() -> datetime:
        async with PrefectClient(api) as client:
            return next(s.timestamp for s in await client.read_flow_run_states(run_id) if s.name == "Pending")

    picked_up_s = (asyncio.run(pending_at()) - created).total_seconds()
    assert picked_up_s < 10, f"picked up after {picked_up_s:.1f} s: at a poll ({POLL_S} s apart), not woken"


def test_clients_of_the_embedded_server_skip_its_version_and_csrf_requests(
        stack: RunningStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stack's own server runs this installation's Prefect with CSRF protection off: its clients
    skip asking either, and their changes still go through (real server)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import (
        PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
        PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED,
        temporary_settings,
    )

    env = stack_env(Settings(data_dir=tmp_path), "key")
    assert env["PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED"] == env["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] == "false"
    assert "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED" not in stack_env(  # another server: Prefect's defaults
        Settings(data_dir=tmp_path, prefect_api_url="http://prefect.example:4200/api"), "key")
    monkeypatch.setenv("PREFECT_SERVER_CSRF_PROTECTION_ENABLED", "true")  # protected: clients need the token
    assert "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED" not in stack_env(Settings(data_dir=tmp_path), "key")

    paths: list[str] = []
    with temporary_settings({PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: False,
                             PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED: False}):
        with SyncPrefectClient(stack.settings.prefect_api) as client:
            client._client.event_hooks["request"].append(lambda request: paths.append(request.url.path))
            flow_id = client.create_flow_from_name(f"csrf-check-{uuid.uuid4().hex[:6]}")
    assert flow_id and paths == ["/api/flows/"]  # the change went through, with no other request before it


def test_the_worker_turns_its_settings_into_environment_variables_once_per_settings_object(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
    from prefect.settings.base import PrefectBaseSettings

    original = PrefectBaseSettings.to_environment_variables
    monkeypatch.setattr(PrefectBaseSettings, "to_environment_variables", original)  # put back after the test
    settings = get_current_settings()
    expected = original(settings, exclude_unset=True)
    calls: list[int] = []

    def counted(self: PrefectBaseSettings, *args: object, **kwargs: object) -> dict[str, str]:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PrefectBaseSettings, "to_environment_variables", counted)
    remember_settings_environment()
    first = settings.to_environment_variables(exclude_unset=True)
    first["PREFECT_API_URL"] = "changed by a caller"  # callers update their own copy
    again = settings.to_environment_variables(exclude_unset=True)
    assert first != again == expected
    assert settings.to_environment_variables() == original(settings)  # other arguments: their own
    root_calls = len(calls)
    settings.to_environment_variables(exclude_unset=True)
    assert len(calls) == root_calls  # nothing computed again

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:1/api"}):  # another settings object
        assert get_current_settings().to_environment_variables(exclude_unset=True)["PREFECT_API_URL"] == \
            "http://127.0.0.1:1/api"
    assert settings.to_environment_variables(exclude_unset=True) == expected
