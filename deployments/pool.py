"""Work pool and GPU concurrency limit of a dreamflow installation (created or updated in place)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
    WorkPoolUpdate,
)
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

from flows.prefect_once import async_client
from flows.settings import GPU_CONCURRENCY_LIMIT as GPU_LIMIT

PROJECT_DIR = Path(__file__).resolve().parent.parent
RERUN_AUTOMATION = "dreamflow: rerun crashed trainings"


def rerun_crashed_trainings() -> AutomationCore:
    """A crashed training (its worker or process died) goes back to the queue and resumes from its
    last checkpoint; the flow itself gives up after a few runs (see flows/training.py)."""
    return AutomationCore(
        name=RERUN_AUTOMATION,
        description="Reschedules dreamflow training runs that crashed, so they resume from their last checkpoint.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.dreamflow"},
            posture=Posture.Reactive, threshold=1,
        ),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", force=True,
                                    message="rerun after a crash; training resumes from its last checkpoint")],
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
        try:
            await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            await client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=gpu_slots))
        except ObjectNotFound:
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=gpu_slots))
        if not await client.read_automations_by_name(RERUN_AUTOMATION):
            await client.create_automation(rerun_crashed_trainings())


def prepare_orchestration(api_url: str, pool: str, gpu_slots: int, command: str | None = None) -> None:
    """Make sure the process work pool, the GPU limit (``gpu_slots`` slots) and the crash-rerun automation exist.

    ``command`` is the pool's flow-run command (the warm runner's launcher); None is Prefect's
    own ``python -m prefect.engine``.
    """
    asyncio.run(_prepare(api_url, pool, gpu_slots, command))
