"""Keep tests that may create trainings from starting real work: pause the pool, cancel what was made.

A paused work pool hands no flow run to its worker, so a training created meanwhile stays
Scheduled; it is then cancelled straight in Prefect (a Cancelled state, as the API does for a
queued run, without queueing a cleanup run) and its stored inputs are deleted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from flows.records import APP_TAG, training_prefix
from stackserver import RunningStack

ACTIVE_TYPES = ["SCHEDULED", "PENDING", "RUNNING", "PAUSED"]


def set_pool_paused(stack: RunningStack, paused: bool) -> None:
    response = httpx.patch(f"{stack.settings.prefect_api}/work_pools/{stack.settings.work_pool}",
                           json={"is_paused": paused}, timeout=10)
    response.raise_for_status()


def active_trainings(stack: RunningStack) -> list[dict]:
    """Flow runs of trainings (tag ``dreamflow``) in an active state, as Prefect's REST API lists them."""
    response = httpx.post(f"{stack.settings.prefect_api}/flow_runs/filter", timeout=30, json={
        "flow_runs": {"tags": {"all_": [APP_TAG]}, "state": {"type": {"any_": ACTIVE_TYPES}}}, "limit": 200})
    response.raise_for_status()
    return response.json()


def cancel_in_prefect(stack: RunningStack, runs: list[dict]) -> None:
    """Force each run to Cancelled and delete its stored inputs."""
    with httpx.Client(base_url=stack.settings.prefect_api, timeout=30) as client:
        for run in runs:
            client.post(f"/flow_runs/{run['id']}/set_state", json={
                "state": {"type": "CANCELLED", "name": "Cancelled", "message": "cancelled by the test"},
                "force": True}).raise_for_status()
            stack.store.delete_prefix(training_prefix(run["name"]))


@contextmanager
def pool_paused(stack: RunningStack) -> Iterator[set[str]]:
    """Pause the stack's pool; afterwards cancel every training that became active meanwhile.

    Yields the ids of the runs that were already active before (left alone).
    """
    before = {run["id"] for run in active_trainings(stack)}
    set_pool_paused(stack, True)
    try:
        yield before
    finally:
        try:
            cancel_in_prefect(stack, [run for run in active_trainings(stack) if run["id"] not in before])
        finally:
            set_pool_paused(stack, False)
