"""The facade's one door to Prefect: start, find, list and cancel training flow runs.

Every training is a flow run of a deployment, named by its training id and tagged with
``training:<id>`` and ``owner:<key hash>``: Prefect is the queue and the record.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import httpx
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterIdempotencyKey,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.states import Cancelled, Cancelling

from flows.params import TrainingParams
from flows.prefect_once import BUSY_STATUS, async_client, send_once
from flows.records import APP_TAG, as_deleted, is_deleted, owner_tag, training_tag

log = logging.getLogger("dreamflow.gateway")

CLEANUP_TAG = "dreamflow-cleanup"
CLEANUP_DEPLOYMENT = "dreamflow-cleanup/cleanup"
LIST_LIMIT = 200
QUEUE_LIMIT = 200  # the most runs one Prefect read returns
STATUS_CACHE_S = 1.0
# Past this share of its life a cached answer is still served, and one query refreshes it in the
# background, so steady polling never waits for Prefect (answers stay at most STATUS_CACHE_S old).
REFRESH_AHEAD = 0.5
CACHE_ENTRIES = 10_000
ACTIVE = {StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED}
NOT_STARTED = {StateType.SCHEDULED, StateType.PAUSED}
ENDED = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED}
# A request to the facade must not hang while Prefect is down or restarting. The client's own
# retries (five, backing off 2-32 s, once it has connected) are switched off (flows/prefect_once.py):
# an unreachable server is a 503 at once (the caller retries, safely with an Idempotency-Key). A
# busy server (502/503/504; Prefect on SQLite answers 503 when a write lost the race for the
# database lock, which under load happens several times in a row) is asked again, after 50 ms and
# then at most every BUSY_RETRY_MAX_S, until the call's time bound.
CALL_TIMEOUT_S = 10.0
BUSY_RETRY_FIRST_S = 0.05
BUSY_RETRY_MAX_S = 0.5
T = TypeVar("T")


class GatewayUnavailable(RuntimeError):
    """Prefect cannot be reached, or the deployment is missing."""


@dataclass(frozen=True)
class TrainingRun:
    """What the facade needs to know about one training's flow run."""

    training_id: str
    flow_run_id: UUID
    state: StateType | None
    state_message: str | None
    created: datetime | None
    parameters: dict[str, Any]
    state_since: datetime | None = None
    deleted: bool = False  # its owner deleted it: the run stays in Prefect's record, the training is gone


def _as_training_run(run: FlowRun) -> TrainingRun:
    return TrainingRun(
        training_id=run.name,
        flow_run_id=run.id,
        state=run.state.type if run.state else None,
        state_message=run.state.message if run.state else None,
        created=run.created,
        parameters=dict(run.parameters.get("params") or {}),
        state_since=run.state.timestamp if run.state else None,
        deleted=is_deleted(run.tags),
    )


def created_at(run: TrainingRun) -> float:
    return run.created.timestamp() if run.created else 0.0


class PrefectGateway:
    """Async gateway over one long-lived Prefect client (enter it once, in the app's lifespan)."""

    def __init__(self, api_url: str, cache_s: float = STATUS_CACHE_S) -> None:
        self._client = async_client(api_url)
        send_once(self._client._client)
        self._deployment_ids: dict[str, UUID] = {}
        self._cache_s = cache_s
        self._recent: dict[tuple[str, str], tuple[float, TrainingRun]] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[TrainingRun | None]] = {}
        self._refreshing: set[tuple[str, str]] = set()  # cached answers whose background refresh has begun
        self._forgotten = 0  # bumped by forget_cached: a query begun before it must not fill the cache

    async def _call(self, request: Callable[[], Awaitable[T]]) -> T:
        """One bounded call to Prefect; unreachable, failing or too slow is GatewayUnavailable.

        A server that cannot be reached is reported at once; a busy one (502/503/504, a dropped
        keep-alive connection) is asked again, at growing intervals, as long as the time bound
        allows; past it, the last busy answer is the 503.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CALL_TIMEOUT_S
        delay = BUSY_RETRY_FIRST_S
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    try:
                        async with prefect_errors():
                            return await request()
                    except GatewayUnavailable as exc:
                        if not _busy(exc.__cause__) or loop.time() + delay >= deadline:
                            raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, BUSY_RETRY_MAX_S)
        except TimeoutError:
            raise GatewayUnavailable(
                f"the orchestrator (Prefect) is unreachable: no answer within {CALL_TIMEOUT_S:.0f} s"
            ) from None

    async def __aenter__(self) -> PrefectGateway:
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.__aexit__(*exc)

    async def _deployment_id(self, name: str) -> UUID:
        if name not in self._deployment_ids:
            try:
                deployment = await self._call(lambda: self._client.read_deployment_by_name(name))
            except ObjectNotFound:
                raise GatewayUnavailable(f"deployment {name!r} is not registered; run `dreamflow up`") from None
            self._deployment_ids[name] = deployment.id
        return self._deployment_ids[name]

    async def start_training(self, deployment: str, params: TrainingParams, idempotency_key: str | None) -> TrainingRun:
        """Queue a flow run of ``deployment``; an idempotency key seen before returns the first run."""
        deployment_id = await self._deployment_id(deployment)
        run = await self._call(lambda: self._client.create_flow_run_from_deployment(
            deployment_id,
            parameters={"params": params.model_dump(mode="json")},
            name=params.training_id,
            tags=[APP_TAG, training_tag(params.training_id), owner_tag(params.owner)],
            idempotency_key=f"{params.owner}:{idempotency_key}" if idempotency_key else None,
        ))
        return _as_training_run(run)

    async def find_training(self, training_id: str, owner: str) -> TrainingRun | None:
        """The caller's training with this id, or None (unknown ids and others' ids alike).

        Answers are reused for ``cache_s`` seconds: many clients polling one training cost one
        Prefect query per interval (requests that miss the cache together share one query), and a
        state is at most that old; an answer half that old is refreshed in the background while it is
        still served. Past ``cache_s``, requests wait for Prefect, so an unreachable server is a 503
        rather than an old answer. Cancel and delete forget the training at once.
        """
        cached = self.cached_training(training_id, owner)
        if cached is not None:
            return cached
        # Requests that miss together share one query; shielded, so a client that disconnects
        # does not cancel it for the others.
        return await asyncio.shield(self._query(training_id, owner))

    def cached_training(self, training_id: str, owner: str) -> TrainingRun | None:
        """The cached answer while it is younger than ``cache_s``, else None; never waits.

        An answer past :data:`REFRESH_AHEAD` of its life starts one background query (once per
        answer), whose result replaces it, so pollers keep being served from memory.
        """
        key = (training_id, owner)
        cached = self._recent.get(key)
        if cached is None:
            return None
        age = time.monotonic() - cached[0]
        if age >= self._cache_s:
            return None
        if age >= self._cache_s * REFRESH_AHEAD and key not in self._refreshing and key not in self._pending:
            self._refreshing.add(key)  # a failed refresh is not retried until the answer expires
            self._query(training_id, owner)
        return cached[1]

    def _query(self, training_id: str, owner: str) -> asyncio.Future[TrainingRun | None]:
        key = (training_id, owner)
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_training(training_id, owner))
            self._pending[key] = pending
            pending.add_done_callback(functools.partial(self._query_done, key))
        return pending

    def _query_done(self, key: tuple[str, str], future: asyncio.Future[TrainingRun | None]) -> None:
        if self._pending.get(key) is future:  # not forgotten (and replaced) meanwhile
            del self._pending[key]
        if not future.cancelled():
            future.exception()  # its waiters saw it; marked retrieved for a query nobody awaits any more

    async def _fetch_training(self, training_id: str, owner: str) -> TrainingRun | None:
        asked, forgotten = time.monotonic(), self._forgotten
        runs = await self._read_runs([training_tag(training_id), owner_tag(owner)], limit=10)
        if not runs:
            if forgotten == self._forgotten:  # gone (deleted elsewhere): not served from memory any more
                self._recent.pop((training_id, owner), None)
                self._refreshing.discard((training_id, owner))
            return None
        run = max(runs, key=created_at)  # a rerun is the newest
        if forgotten == self._forgotten:  # no cancel or delete since it was asked: worth keeping
            if len(self._recent) > CACHE_ENTRIES:
                self._recent.clear()
                self._refreshing.clear()
            self._recent[(training_id, owner)] = (asked, run)
            self._refreshing.discard((training_id, owner))
        return run

    def forget_cached(self, training_id: str, owner: str) -> None:
        """Drop the cached answer and stop sharing a query already under way (it may predate a change)."""
        self._forgotten += 1
        self._recent.pop((training_id, owner), None)
        self._pending.pop((training_id, owner), None)
        self._refreshing.discard((training_id, owner))

    async def list_trainings(self, owner: str) -> list[TrainingRun]:
        """The caller's trainings, newest first."""
        runs = await self._read_runs([APP_TAG, owner_tag(owner)], limit=LIST_LIMIT)
        return sorted(runs, key=created_at, reverse=True)

    async def cancel_training(self, run: TrainingRun, owner: str) -> bool:
        """Cancel a queued run at once; ask the worker to stop a started one (Cancelling).

        The state is read afresh (not from the cache), so a run a worker has just started is never
        marked Cancelled behind its process's back, and a run that has just ended keeps its final
        state (forced to Cancelling, it would stay so: no process is left to finish the cancel).
        Returns whether the run had started.
        """
        self.forget_cached(run.training_id, owner)
        current = await self._call(lambda: self._client.read_flow_run(run.flow_run_id))
        state_type = current.state.type if current.state else None
        if state_type in (StateType.CANCELLED, StateType.CANCELLING):
            return state_type == StateType.CANCELLING
        if state_type in ENDED:
            return True
        started = state_type not in NOT_STARTED
        state = Cancelling(message="cancelled by the owner") if started else Cancelled(message="cancelled by the owner")
        await self._call(lambda: self._client.set_flow_run_state(run.flow_run_id, state, force=True))
        return started

    async def forget_training(self, run: TrainingRun, owner: str) -> TrainingRun:
        """Take the run out of its owner's view (the run stays in Prefect's record, marked deleted);
        returns the run as it is now (its state read afresh)."""
        self.forget_cached(run.training_id, owner)
        current = await self._call(lambda: self._client.read_flow_run(run.flow_run_id))
        tags = as_deleted(current.tags)
        await self._call(lambda: self._client.update_flow_run(run.flow_run_id, tags=tags))
        return _as_training_run(current)

    async def start_cleanup(self, training_id: str, run: TrainingRun, reason: str, tell_webhook: bool = True) -> None:
        """Queue the cleanup flow that waits for the run to end, then removes its artifacts; with
        ``tell_webhook``, it tells the training's webhook (if any) that the training was cancelled."""
        deployment_id = await self._deployment_id(CLEANUP_DEPLOYMENT)
        webhook = run.parameters.get("webhook") if tell_webhook else None
        await self._call(lambda: self._client.create_flow_run_from_deployment(
            deployment_id,
            parameters={"training_id": training_id, "flow_run_id": str(run.flow_run_id), "reason": reason,
                        "webhook": webhook},
            name=f"cleanup-{training_id}",
            tags=[CLEANUP_TAG, f"cleanup:{training_id}"],
        ))

    async def count_active_trainings(self, owner: str | None = None) -> int:
        """Trainings (flow runs tagged ``dreamflow``) queued, pending, running or paused, of every owner
        or of ``owner``."""
        active = FlowRunFilterState(type=FlowRunFilterStateType(any_=sorted(ACTIVE)))
        tags = [APP_TAG] if owner is None else [APP_TAG, owner_tag(owner)]
        return await self._call(lambda: self._client.count_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags), state=active)
        ))

    async def active_trainings(self, limit: int = QUEUE_LIMIT) -> list[TrainingRun]:
        """Trainings of every owner queued, pending, running or paused, oldest first."""
        active = FlowRunFilterState(type=FlowRunFilterStateType(any_=sorted(ACTIVE)))
        runs = await self._call(lambda: self._client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[APP_TAG]), state=active),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=limit,
        ))
        return sorted((_as_training_run(r) for r in runs), key=created_at)

    async def find_by_idempotency_key(self, owner: str, idempotency_key: str) -> TrainingRun | None:
        """The caller's run created with this idempotency key, if any (a replay is never refused)."""
        runs = await self._call(lambda: self._client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[APP_TAG, owner_tag(owner)]),
            idempotency_key=FlowRunFilterIdempotencyKey(any_=[f"{owner}:{idempotency_key}"]),
        ), limit=5))
        return max((_as_training_run(r) for r in runs), key=created_at, default=None)

    async def _read_runs(self, tags: list[str], limit: int) -> list[TrainingRun]:
        runs = await self._call(lambda: self._client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)), limit=limit
        ))
        return [_as_training_run(r) for r in runs]


def _busy(cause: BaseException | None) -> bool:
    """A failure worth asking again at once: a busy server, or a keep-alive connection it dropped."""
    if isinstance(cause, PrefectHTTPStatusError):
        return cause.response.status_code in BUSY_STATUS
    return isinstance(cause, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError))


@asynccontextmanager
async def prefect_errors() -> AsyncIterator[None]:
    """Map transport failures of the Prefect API to :class:`GatewayUnavailable`."""
    try:
        yield
    except httpx.TransportError as exc:
        raise GatewayUnavailable(f"the orchestrator (Prefect) is unreachable: {exc}") from exc
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code >= 500:
            raise GatewayUnavailable(f"the orchestrator (Prefect) answered {exc.response.status_code}") from exc
        raise
