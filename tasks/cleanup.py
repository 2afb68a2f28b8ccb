"""Removing a training's artifacts after a cancel or a delete."""

from __future__ import annotations

import time
from uuid import UUID

from prefect import get_client, task
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectNotFound

from flows.records import APP_TAG, as_deleted, training_prefix, training_tag
from tasks.context import notify_webhook, remove_workdir, run_logger, worker_store

WAIT_LIMIT_S = 300.0
POLL_S = 1.0


@task(name="wait-for-run-end")
def wait_for_run_end(training_id: str, flow_run_id: str | None = None) -> list[str]:
    """Wait until the training's flow run (without one named, each flow run tagged with the training)
    reached a final state, its process gone; returns their states. A run Prefect does not know has
    nothing to wait for."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    with get_client(sync_client=True) as client:
        run_ids = [UUID(flow_run_id)] if flow_run_id else [run.id for run in _training_runs(client, training_id)]
        return [_wait_for_end(client, run_id, deadline) for run_id in run_ids]


def _wait_for_end(client: SyncPrefectClient, run_id: UUID, deadline: float) -> str:
    while True:
        try:
            state = client.read_flow_run(run_id).state
        except ObjectNotFound:
            return "NOT_FOUND"
        if state is None or state.is_final() or time.monotonic() > deadline:
            return state.type.value if state else "UNKNOWN"
        time.sleep(POLL_S)


def _training_runs(client: SyncPrefectClient, training_id: str) -> list[FlowRun]:
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        tags=FlowRunFilterTags(all_=[APP_TAG, training_tag(training_id)])), limit=50)


@task(name="forget-training", retries=3, retry_delay_seconds=[1, 2, 5])
def forget_training(training_id: str) -> int:
    """Take the training out of its owner's view (``owner:<hash>`` becomes ``deleted-owner:<hash>`` on
    each of its flow runs), as a delete through the facade does; returns how many runs changed."""
    changed = 0
    with get_client(sync_client=True) as client:
        for run in _training_runs(client, training_id):
            tags = as_deleted(run.tags)
            if tags != run.tags:
                client.update_flow_run(run.id, tags=tags)
                changed += 1
    return changed


@task(name="delete-artifacts", retries=20, retry_delay_seconds=[1, 2, 5, 10, 30])
def delete_artifacts(training_id: str) -> int:
    """Remove every stored object of the training and its local work folder; returns the count."""
    removed = worker_store().delete_prefix(training_prefix(training_id))
    remove_workdir(training_id)
    run_logger().info("removed %d objects of training %s", removed, training_id)
    return removed


@task(name="announce-cancelled")
def announce_cancelled(training_id: str, webhook: str, logs: str) -> None:
    """Tell the training's webhook that it was cancelled."""
    notify_webhook(training_id, webhook, "cancelled", logs)
