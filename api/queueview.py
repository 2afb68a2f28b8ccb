"""How long a training waits for the trainings queued or running ahead of it.

One Prefect read of the active trainings every few seconds serves every status request and create
answer: statuses are composed in worker threads from the last snapshot, and a snapshot older than
``max_age_s`` is replaced in the background (create answers wait for a fresh one). The wait is a
first-come-first-served schedule of the runs ahead on ``gpu_slots`` slots, each taking the
registry's estimate for its step count, less the time it has run already.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from datetime import datetime, timezone

from prefect.client.schemas.objects import StateType

from api.gateway import PrefectGateway, TrainingRun
from api.status import QueueWait, job_seconds
from flows.registry import BaseModelEntry

QUEUE_VIEW_S = 5.0
UNKNOWN_SECONDS_PER_STEP = 1.0

log = logging.getLogger("dreamflow.api")


class QueueView:
    """The last snapshot of the active trainings, and the waits computed from it."""

    def __init__(self, gateway: PrefectGateway, registry: dict[str, BaseModelEntry], gpu_slots: int,
                 max_age_s: float = QUEUE_VIEW_S) -> None:
        self._gateway = gateway
        self._registry = registry
        self._slots = max(1, gpu_slots)
        self._max_age = max_age_s
        self._runs: list[TrainingRun] = []
        self._taken_at = float("-inf")
        self._taken_wall = datetime.now(timezone.utc)
        self._refreshing: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def wait_for(self, training_id: str, created: datetime | None) -> QueueWait:
        """The wait of a training created at ``created`` (None: now) from the last snapshot; asks for a
        new snapshot when it is old. Never waits; safe to call from worker threads."""
        if time.monotonic() - self._taken_at >= self._max_age and self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_refresh)
        ahead = [run for run in self._runs if run.training_id != training_id
                 and (created is None or (run.created is not None and run.created < created))]
        return QueueWait(len(ahead), first_free_slot([self._seconds_left(run) for run in ahead], self._slots))

    async def fresh_wait_for(self, training_id: str, created: datetime | None) -> QueueWait:
        """:meth:`wait_for` after a fresh snapshot, when the last is old."""
        if time.monotonic() - self._taken_at >= self._max_age:
            self._start_refresh()
            await asyncio.shield(self._refreshing)
        return self.wait_for(training_id, created)

    def note(self, run: TrainingRun) -> None:
        """A run this facade has just queued: ahead of the next ones before the next snapshot has it."""
        if all(known.flow_run_id != run.flow_run_id for known in self._runs):
            self._runs = [*self._runs, run]

    def forget(self, training_id: str) -> None:
        """A run this facade has just cancelled or deleted: no longer ahead of anything."""
        self._runs = [run for run in self._runs if run.training_id != training_id]

    def _start_refresh(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = self._loop.create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            self._runs = await self._gateway.active_trainings()
            self._taken_wall = datetime.now(timezone.utc)
        except Exception as exc:  # noqa: BLE001 - an estimate: the last snapshot stands, retried later
            log.warning("queue view not refreshed: %s", exc)
        self._taken_at = time.monotonic()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop that refreshes the snapshot for worker threads."""
        self._loop = loop

    def _seconds_left(self, run: TrainingRun) -> float:
        entry = self._registry.get(str(run.parameters.get("base_model_id")))
        steps = int(run.parameters.get("max_train_steps") or 0)
        total = job_seconds(steps, entry.seconds_per_step if entry else UNKNOWN_SECONDS_PER_STEP)
        if run.state == StateType.RUNNING and run.state_since is not None:
            total -= (self._taken_wall - run.state_since).total_seconds()  # as of the snapshot: answers
            # composed from one snapshot agree
        return max(0.0, total)


def first_free_slot(jobs_ahead: list[float], slots: int) -> float:
    """Seconds until one of ``slots`` is free when the jobs ahead (in queue order, by remaining
    seconds) each take the first slot that frees up."""
    free_at = [0.0] * slots
    for seconds in jobs_ahead:
        heapq.heapreplace(free_at, free_at[0] + seconds)
    return free_at[0]
