"""Removing a training's artifacts after a cancel or a delete."""

from __future__ import annotations

import time
from uuid import UUID

from prefect import get_client, task
from prefect.client.schemas.objects import StateType

from flows.records import training_prefix
from tasks.context import notify_webhook, remove_workdir, run_logger, worker_store

FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
WAIT_LIMIT_S = 300.0
POLL_S = 1.0


@task(name="wait-for-run-end")
def wait_for_run_end(flow_run_id: str) -> str:
    """Wait until the training's flow run reached a final state (its process is gone); returns it."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(UUID(flow_run_id)).state
            if state is None or state.type in FINAL or time.monotonic() > deadline:
                return state.type.value if state else "UNKNOWN"
            time.sleep(POLL_S)


@task(name="delete-artifacts", retries=20, retry_delay_seconds=[1, 2, 5, 10, 30])
def delete_artifacts(training_id: str) -> int:
    """Remove every stored object of the training and its local work folder; returns the count."""
    removed = worker_store().delete_prefix(training_prefix(training_id))
    remove_workdir(training_id)
    run_logger().info("removed %d objects of training %s", removed, training_id)
    return removed


@task(name="announce-cancelled")
def announce_cancelled(training_id: str, webhook: str | None) -> None:
    """Tell the training's webhook that it was cancelled."""
    if webhook:
        notify_webhook(training_id, webhook, "cancelled", "training cancelled by the owner")
