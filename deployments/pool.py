"""Work pool and GPU concurrency limit of a dreamflow installation (created or updated in place)."""

from __future__ import annotations

import asyncio

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate, WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

from flows.settings import GPU_CONCURRENCY_LIMIT as GPU_LIMIT


async def _prepare(api_url: str, pool: str, gpu_slots: int) -> None:
    async with PrefectClient(api_url) as client:
        try:
            await client.read_work_pool(pool)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", description="dreamflow trainings and cleanups",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            ))
        try:
            await client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            await client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=gpu_slots))
        except ObjectNotFound:
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=gpu_slots))


def prepare_orchestration(api_url: str, pool: str, gpu_slots: int) -> None:
    """Make sure the process work pool exists and the GPU limit holds ``gpu_slots`` slots."""
    asyncio.run(_prepare(api_url, pool, gpu_slots))
