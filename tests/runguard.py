"""Keep tests that may create trainings from starting real work: pause the pool, cancel what was made.

A paused work pool hands no flow run to its worker, so a training created meanwhile stays
Scheduled; it is then cancelled straight in Prefect (a Cancelled state, as the API does for a
queued run, without queueing a cleanup run) and its stored inputs are deleted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flows.records import APP_TAG, training_prefix
from stackserver import RunningStack, prefect_request

ACTIVE_TYPES = ["SCHEDULED", "PENDING", "RUNNING", "PAUSED"]


def active_trainings(stack: RunningStack) -> list[dict]:
    """Flow runs of trainings (tag ``dreamflow``) in an active state, as Prefect's REST API lists them."""
    return prefect_request("POST", f"{stack.settings.prefect_api}/flow_runs/filter", {
        "flow_runs": {"tags": {"all_": [APP_TAG]}, "state": {"type": {"any_": ACTIVE_TYPES}}}, "limit": 200}).json()


def cancel_inprefect_request(stack: RunningStack, runs: list[dict]) -> None:
    """Force each run to Cancelled and delete its stored inputs."""
    for run in runs:
        prefect_request("POST", f"{stack.settings.prefect_api}/flow_runs/{run['id']}/set_state", {
            "state": {"type": "CANCELLED", "name": "Cancelled", "message": "cancelled by the test"}, "force": True})
        stack.store.delete_prefix(training_prefix(run["name"]))


@contextmanager
def pool_paused(stack: RunningStack) -> Iterator[set[str]]:
    """Pause the stack's pool; afterwards cancel every training that became active meanwhile.

    Yields the ids of the runs that were already active before (left alone).
    """
    before = {run["id"] for run in active_trainings(stack)}
    stack.set_pool_paused(True)
    try:
        yield before
    finally:
        try:
            cancel_inprefect_request(stack, [run for run in active_trainings(stack) if run["id"] not in before])
        finally:
            stack.set_pool_paused(False)
