"""Make a training's flow run look like one the facade started, whoever started it.

The facade finds trainings by flow-run tags (``dreamflow``, ``training:<id>``, ``owner:<hash>``)
and names each run by its training id. A run started from the Prefect UI, a schedule or a parent
flow has neither, so the training flow registers its own run first.
"""

from __future__ import annotations

from uuid import UUID

from prefect import get_client, task
from prefect.runtime import flow_run

from flows.params import TrainingParams
from flows.records import APP_TAG, owner_tag, training_tag


def run_tags(params: TrainingParams) -> list[str]:
    """The tags that put a training in its owner's ``finetune_list`` and status."""
    return [APP_TAG, training_tag(params.training_id), owner_tag(params.owner)]


@task(name="register-run", retries=3, retry_delay_seconds=[1, 2, 5])
def tag_own_run(params: TrainingParams) -> list[str]:
    """Add the facade's tags to the current flow run and name it by the training id; returns its tags.

    Runs the facade created already carry them, and then nothing is written; a run its owner
    deleted (tagged ``deleted-owner:<hash>``) is left out of the owner's view.
    """
    run_id = flow_run.get_id()
    if run_id is None:
        return []
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(UUID(run_id))
        wanted = [t for t in run_tags(params) if f"deleted-{t}" not in current.tags]
        tags = list(dict.fromkeys([*current.tags, *wanted]))
        if tags != list(current.tags) or current.name != params.training_id:
            client.update_flow_run(UUID(run_id), name=params.training_id, tags=tags)
    return tags


def stage_seconds() -> dict[str, float]:
    """Wall seconds per stage of the current flow run (its finished task runs, summed by task name).

    For the manifest; a task that runs twice (the two uploads, or a rerun after a crash) adds up.
    """
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    run_id = flow_run.get_id()
    if run_id is None:
        return {}
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[UUID(run_id)])))
    totals: dict[str, float] = {}
    for run in task_runs:
        if run.start_time is not None and run.end_time is not None:
            name = run.name.rsplit("-", 1)[0]  # "train-model-9ce" -> "train-model"
            totals[name] = totals.get(name, 0.0) + (run.end_time - run.start_time).total_seconds()
    return {name: round(seconds, 3) for name, seconds in sorted(totals.items())}
