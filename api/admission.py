"""The queue limit: at most ``max_queued`` trainings queued or running at once, checked against Prefect.

Prefect stays the queue and the record (SPEC §6): the facade counts our trainings' flow runs in an
active state (scheduled, late, pending, running, paused) and refuses a create past the limit with
429 and ``Retry-After``. Counting and creating are two Prefect calls, so concurrent requests could
all count the same number and all create; :class:`Admission` holds one ``asyncio.Lock`` across
both. That makes the limit exact for one facade process, which is how dreamflow runs the facade;
several facade processes behind a balancer would each serialize only their own requests (the limit
would then be exceeded by at most the number of processes minus one).
"""

from __future__ import annotations

import asyncio
import time

from api.errors import ApiError
from api.gateway import PrefectGateway, TrainingRun
from api.queueview import QueueView
from flows.params import TrainingParams

FULL_FRESH_S = 1.0


def queue_full(limit: int, retry_after_s: int, per_key: bool = False) -> ApiError:
    whose = "of this API key " if per_key else ""
    return ApiError(
        429, f"too many trainings {whose}queued or running (limit {limit}{' per key' if per_key else ''}); "
             f"retry in {retry_after_s} s",
        headers={"Retry-After": str(retry_after_s)},
    )


class Admission:
    """Serializes "count the active trainings, then create one" inside this facade process.

    A count that found the queue full is trusted for ``full_fresh_s``: in a burst, the requests
    waiting on the lock behind it are refused at once instead of each asking Prefect again (a
    training that ends meanwhile frees its place at most that much later, which only errs towards
    refusing).
    """

    def __init__(self, gateway: PrefectGateway, limit: int, retry_after_s: int, queue: QueueView,
                 per_key_limit: int | None = None, full_fresh_s: float = FULL_FRESH_S) -> None:
        self.limit = limit
        self.per_key_limit = per_key_limit or limit  # one key's share: it cannot lock the others out
        self.queue = queue  # what is ahead of a training admitted now
        self.retry_after_s = retry_after_s
        self._gateway = gateway
        self._lock = asyncio.Lock()
        self._full_fresh_s = full_fresh_s
        self._full_seen_at: float | None = None
        self._active = 0  # active trainings at the last count

    def recently_full(self) -> bool:
        """Whether a count less than ``full_fresh_s`` ago found the queue full (no I/O)."""
        return self._full_seen_at is not None and time.monotonic() - self._full_seen_at < self._full_fresh_s

    def refuse_if_recently_full(self, idempotency_key: str | None) -> None:
        """429 before any work when the queue was just found full (a possible replay goes on to the check)."""
        if idempotency_key is None and self.recently_full():
            raise queue_full(self.limit, self.retry_after_s)

    async def _count_says_full(self) -> bool:
        self._active = await self._gateway.count_active_trainings()
        full = self._active >= self.limit
        self._full_seen_at = time.monotonic() if full else None
        return full

    async def _owner_has_its_share(self, owner: str) -> bool:
        """Whether ``owner`` holds ``per_key_limit`` active trainings (asked only when that many are active)."""
        return self._active >= self.per_key_limit and await self._gateway.count_active_trainings(owner) >= self.per_key_limit

    async def start_training(self, deployment: str, params: TrainingParams, idempotency_key: str | None) -> TrainingRun:
        """Queue the run if fewer than ``limit`` trainings are active; 429 otherwise."""
        gateway = self._gateway
        async with self._lock:
            full = self.recently_full() or await self._count_says_full()
            if full or await self._owner_has_its_share(params.owner):
                replay = await gateway.find_by_idempotency_key(params.owner, idempotency_key) if idempotency_key else None
                if replay is None:
                    raise queue_full(self.limit if full else self.per_key_limit, self.retry_after_s, per_key=not full)
                return replay
            run = await gateway.start_training(deployment, params, idempotency_key)
            if run.training_id == params.training_id:  # new, not an idempotent replay's first run
                self.queue.note(run)
            return run
