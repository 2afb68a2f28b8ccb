"""Make a training's flow run look like one the facade started, whoever started it.

The facade finds trainings by flow-run tags (``dreamflow``, ``training:<id>``, ``owner:<hash>``)
and names each run by its training id. A run started from the Prefect UI, a schedule or a parent
flow has neither, so the training flow registers its own run first.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

from prefect import get_client, task
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags
from prefect.context import FlowRunContext, TaskRunContext
from prefect.runtime import flow_run
from prefect.states import State

from flows.params import TrainingParams
from flows.records import APP_TAG, owner_tag, read_manifest, tagged_owners, training_tag
from flows.registry import UnknownBaseModel
from tasks.context import base_model, worker_settings, worker_store

F = TypeVar("F", bound=Callable[..., Any])

_stage_times: dict[UUID, dict[UUID, tuple[str, float]]] = {}
"""Flow run id -> task run id -> (stage, wall seconds) of the stages this process ran."""


def timed_stage(fn: F) -> F:
    """Decorate a stage's function (under ``@task``) so that this process knows its wall seconds.

    Prefect's API learns that a task run ended from the run's events, a moment later and in the
    server's own time: read right after a stage, it may not list that stage yet (the manifest
    missed its samples' seconds so). Attempts of one task run add up.
    """

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _record(time.perf_counter() - started)

    return timed  # type: ignore[return-value]


def _record(seconds: float) -> None:
    context = TaskRunContext.get()
    if context is None or context.task_run is None or context.task_run.flow_run_id is None:
        return
    runs = _stage_times.setdefault(context.task_run.flow_run_id, {})
    _, before = runs.get(context.task_run.id, ("", 0.0))
    runs[context.task_run.id] = (context.task.name, before + seconds)


def run_tags(params: TrainingParams) -> list[str]:
    """The tags that put a training in its owner's ``finetune_list`` and status."""
    return [APP_TAG, training_tag(params.training_id), owner_tag(params.owner)]


class TrainingRefused(ValueError):
    """A run that must not train as asked: its training id is another run's, or it exceeds the limits."""


def _unless_refused(task: Any, task_run: Any, state: State) -> bool:
    """Retry condition: a refusal is final; anything else (the API busy, say) is worth another try."""
    try:
        state.result()
    except TrainingRefused:
        return False
    except Exception:  # noqa: BLE001 - any other failure may pass on a retry
        return True
    return True


@task(name="register-run", retries=3, retry_delay_seconds=[1, 2, 5], retry_condition_fn=_unless_refused)
@timed_stage
def tag_own_run(params: TrainingParams) -> list[str]:
    """Add the facade's tags to the current flow run and name it by the training id; returns its tags.

    Runs the facade created already carry them, as the run's context (read when the run started)
    shows, and then nothing is read or written (the facade checked the request). Any other run (the
    Prefect UI, a schedule, a parent flow) is first checked as the facade would check it
    (:func:`check_claim`). A run its owner deleted (tagged ``deleted-owner:<hash>``) is left out of
    the owner's view.
    """
    run_id = flow_run.get_id()
    if run_id is None:
        return []
    context = FlowRunContext.get()
    started_as = context.flow_run if context is not None else None
    if started_as is not None and started_as.name == params.training_id and set(run_tags(params)) <= set(started_as.tags):
        return list(started_as.tags)
    with get_client(sync_client=True) as client:
        check_claim(client, UUID(run_id), params)
        current = client.read_flow_run(UUID(run_id))
        wanted = [t for t in run_tags(params) if f"deleted-{t}" not in current.tags]
        tags = list(dict.fromkeys([*current.tags, *wanted]))
        if tags != list(current.tags) or current.name != params.training_id:
            client.update_flow_run(UUID(run_id), name=params.training_id, tags=tags)
    return tags


def check_claim(client: SyncPrefectClient, run_id: UUID, params: TrainingParams) -> None:
    """Raise :class:`TrainingRefused` for a run the facade would not have started: over the step or
    image limits, on an unknown base model, or under a training id that another owner's run, a
    run still going, or a finished model holds. An earlier attempt of the same owner that ended
    without a model (failed, cancelled) may be retried under its id."""
    settings = worker_settings()
    if params.max_train_steps > settings.max_train_steps_limit:
        raise TrainingRefused(f"max_train_steps {params.max_train_steps} is over this deployment's limit "
                              f"of {settings.max_train_steps_limit}")
    if len(params.images) > settings.max_images:
        raise TrainingRefused(f"{len(params.images)} images; at most {settings.max_images} per training")
    try:
        base_model(params.base_model_id)
    except UnknownBaseModel as exc:
        raise TrainingRefused(str(exc)) from None
    others = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        tags=FlowRunFilterTags(all_=[training_tag(params.training_id)]), id=FlowRunFilterId(not_any_=[run_id]),
    ), limit=50)
    taken = f"training id {params.training_id!r}"
    for other in others:
        if params.owner not in tagged_owners(other.tags):
            raise TrainingRefused(f"{taken} belongs to another owner's training; choose another id")
        if other.state is not None and not other.state.is_final():
            raise TrainingRefused(f"{taken} is in use by flow run {other.name!r} ({other.state.name}); "
                                  "wait for it to end or choose another id")
    if read_manifest(worker_store(), params.training_id) is not None:
        raise TrainingRefused(f"{taken} already has a finished model; delete it first or choose another id")


def stage_seconds() -> dict[str, float]:
    """Wall seconds per stage of the current flow run, summed by task name, for the manifest.

    The stages this process ran, as it timed them, plus the finished task runs Prefect records for
    the run that this process did not run (an attempt before a crash): a task that runs twice (the
    two uploads, or a rerun after a crash) adds up. A first attempt ran every stage here, and its
    stage seconds need no API call.
    """
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    run_id = flow_run.get_id()
    if run_id is None:
        return {}
    local = _stage_times.get(UUID(run_id), {})
    task_runs = []
    if (flow_run.run_count or 1) > 1:
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[UUID(run_id)])))
    totals: dict[str, float] = {}
    for name, seconds in local.values():
        totals[name] = totals.get(name, 0.0) + seconds
    for run in task_runs:
        if run.id not in local and run.start_time is not None and run.end_time is not None:
            name = run.name.rsplit("-", 1)[0]  # "train-model-9ce" -> "train-model"
            totals[name] = totals.get(name, 0.0) + (run.end_time - run.start_time).total_seconds()
    return {name: round(seconds, 3) for name, seconds in sorted(totals.items())}
