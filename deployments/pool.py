"""Work pool, GPU concurrency limit and crash-rerun automation of a dreamflow installation (created or
updated in place)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
    WorkPoolUpdate,
)
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType
from prefect.events.actions import RunDeployment
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Crashed, Scheduled
from prefect.workers.process import ProcessWorker

from flows.prefect_once import async_client
from flows.records import APP_TAG
from flows.settings import GPU_CONCURRENCY_LIMIT as GPU_LIMIT

PROJECT_DIR = Path(__file__).resolve().parent.parent
RERUN_AUTOMATION = "dreamflow: rerun crashed trainings"
RECOVERY_DEPLOYMENT = "dreamflow-crash-recovery/recover-crashed"
MAINTENANCE_QUEUE = "maintenance"  # prefect.yaml's cleanup and recover-crashed deployments use it


def rerun_crashed_trainings(recovery_deployment: UUID) -> AutomationCore:
    """A crashed training (its worker or process died) starts the crash-recovery flow
    (flows/recover.py), which queues it again to resume from its last checkpoint, or fails it
    after its third crash."""
    return AutomationCore(
        name=RERUN_AUTOMATION,
        description="Starts dreamflow's crash recovery for a crashed training run: rerun from its "
                    "last checkpoint, at most twice.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.dreamflow"},
            posture=Posture.Reactive, threshold=1,
        ),
        actions=[RunDeployment(source="selected", deployment_id=recovery_deployment,
                               parameters={"crashed": "{{ event.resource.id }}"})],
    )


def job_template(command: str | None) -> dict:
    """The process worker's job template: ``command`` the default flow-run command, run in this checkout
    (the deployments have no pull step to change into it)."""
    template = ProcessWorker.get_default_base_job_template()
    properties = template["variables"]["properties"]
    properties["command"]["default"] = command
    properties["working_dir"]["default"] = str(PROJECT_DIR)
    return template


async def _prepare(api_url: str, pool: str, gpu_slots: int, command: str | None) -> None:
    async with async_client(api_url) as client:
        try:
            await client.read_work_pool(pool)
            await client.update_work_pool(pool, WorkPoolUpdate(base_job_template=job_template(command)))
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", description="dreamflow trainings and cleanups",
                base_job_template=job_template(command),
            ))
        await _prepare_maintenance_queue(client, pool)
        try:
            await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            await client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=gpu_slots))
        except ObjectNotFound:
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=gpu_slots))


async def _prepare_maintenance_queue(client: PrefectClient, pool: str) -> None:
    """The pool's queue for cleanups and crash recoveries, first in priority (Prefect hands a worker
    the runs of higher-priority queues first; the pool's "default" queue moves behind it)."""
    try:
        queue = await client.read_work_queue_by_name(MAINTENANCE_QUEUE, work_pool_name=pool)
        if queue.priority != 1:
            await client.update_work_queue(queue.id, priority=1)
    except ObjectNotFound:
        await client.create_work_queue(MAINTENANCE_QUEUE, work_pool_name=pool, priority=1,
                                       description="cleanups and crash recoveries, ahead of queued trainings")


def prepare_orchestration(api_url: str, pool: str, gpu_slots: int, command: str | None = None) -> None:
    """Make sure the process work pool and the GPU limit (``gpu_slots`` slots) exist (before the deployments).

    ``command`` is the pool's flow-run command (the warm runner's launcher); None is Prefect's
    own ``python -m prefect.engine``.
    """
    asyncio.run(_prepare(api_url, pool, gpu_slots, command))


ScheduleStates = dict[tuple[UUID, str], bool]


async def _schedule_states(api_url: str) -> ScheduleStates:
    async with async_client(api_url) as client:
        deployments = await client.read_deployments()
    return {(d.id, str(s.schedule)): s.active for d in deployments for s in d.schedules or []}


def schedule_states(api_url: str) -> ScheduleStates:
    """Whether each deployment schedule is on, by deployment and schedule (read before a deploy)."""
    return asyncio.run(_schedule_states(api_url))


async def _restore_schedule_states(api_url: str, before: ScheduleStates) -> int:
    restored = 0
    async with async_client(api_url) as client:
        for deployment in await client.read_deployments():
            for schedule in deployment.schedules or []:
                was = before.get((deployment.id, str(schedule.schedule)))
                if was is not None and was != schedule.active:
                    await client.update_deployment_schedule(deployment.id, schedule.id, active=was)
                    restored += 1
    return restored


def restore_schedule_states(api_url: str, before: ScheduleStates) -> int:
    """Turn each schedule back on or off as it was before ``prefect deploy --all``, which applies
    prefect.yaml's ``active:`` again (a retraining schedule turned on in the UI would go off at
    every restart). A schedule whose timing changed in prefect.yaml takes the file's setting.
    Returns how many were changed back."""
    return asyncio.run(_restore_schedule_states(api_url, before))


async def _prepare_crash_recovery(api_url: str) -> None:
    async with async_client(api_url) as client:
        recovery = await client.read_deployment_by_name(RECOVERY_DEPLOYMENT)
        automation = rerun_crashed_trainings(recovery.id)
        existing = await client.read_automations_by_name(RERUN_AUTOMATION)
        if not existing:
            await client.create_automation(automation)
            return
        await client.update_automation(existing[0].id, automation)  # say, an older dreamflow's
        for extra in existing[1:]:  # two would start two recoveries per crash
            await client.delete_automation(extra.id)


def prepare_crash_recovery(api_url: str) -> None:
    """Make sure the crash-rerun automation exists and starts the recovery deployment (after
    ``prefect deploy --all``, which creates that deployment)."""
    asyncio.run(_prepare_crash_recovery(api_url))


INTERRUPTED = "its process stopped with the stack (dreamflow up stopped or crashed); dreamflow up started again"
GOING = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]


async def _recover_interrupted_runs(api_url: str, pool: str) -> list[str]:
    async with async_client(api_url) as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=GOING))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])), limit=200,
        )
        recovery = await client.read_deployment_by_name(RECOVERY_DEPLOYMENT) if runs else None
        done = []
        for run in runs:
            if run.state.type == StateType.CANCELLING:  # nothing is left to finish the cancel
                await client.set_flow_run_state(run.id, Cancelled(message=f"cancelled; {INTERRUPTED}"), force=True)
                done.append(f"{run.name}: cancelled")
            elif APP_TAG in run.tags:  # a training: crash recovery reruns it from its last checkpoint (or fails it)
                await client.set_flow_run_state(run.id, Crashed(message=f"crashed: {INTERRUPTED}"), force=True)
                await client.create_flow_run_from_deployment(recovery.id, parameters={"crashed": str(run.id)},
                                                             name=f"recover-{run.name}")
                done.append(f"{run.name}: crashed, recovery started")
            else:  # a cleanup, a recovery, a retraining: each may run again from its start
                await client.set_flow_run_state(run.id, Scheduled(message=f"queued again; {INTERRUPTED}"), force=True)
                done.append(f"{run.name}: queued again")
        return done


def recover_interrupted_runs(api_url: str, pool: str) -> list[str]:
    """At the start of a stack whose Prefect server is its own, before its workers start: the pool's
    runs still pending, running or cancelling lost their processes when the last stack stopped (its
    processes stop together, the server with them, so nobody recorded their end). Each training is
    marked Crashed and handed to crash recovery (it resumes from its last checkpoint); a cancel is
    completed; any other run is queued again. Returns one line per run."""
    return asyncio.run(_recover_interrupted_runs(api_url, pool))


if __name__ == "__main__":  # python -m deployments.pool crash-recovery   (after prefect deploy --all)
    import sys

    from flows.settings import get_settings

    if sys.argv[1:] != ["crash-recovery"]:
        sys.exit("usage: python -m deployments.pool crash-recovery")
    prepare_crash_recovery(get_settings().prefect_api)
