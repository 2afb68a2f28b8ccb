"""The facade's status answers under many pollers: one Prefect query per refresh, reused bodies.

These exercise the gateway's and the status cache's own logic in-process; the Prefect query is
replaced by a counting coroutine (the end-to-end and contract tests cover the real one).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from uuid import uuid4

import pytest

from prefect.client.schemas.objects import StateType

from api.gateway import GatewayUnavailable, PrefectGateway, TrainingRun
from api.statuscache import StatusCache


def a_run(training_id: str = "abc") -> TrainingRun:
    return TrainingRun(training_id, uuid4(), StateType.RUNNING, None, None, {})


class CountingGateway(PrefectGateway):
    def __init__(self, cache_s: float = 1.0) -> None:
        super().__init__("http://127.0.0.1:9/api", cache_s=cache_s)
        self.queries = 0

    async def _read_runs(self, tags: list[str], limit: int) -> list[TrainingRun]:
        self.queries += 1
        await asyncio.sleep(0.05)  # a Prefect round trip: every concurrent miss arrives meanwhile
        return [a_run()]


def test_fifty_concurrent_misses_cost_one_prefect_query() -> None:
    async def scenario() -> tuple[int, set[int]]:
        gateway = CountingGateway()
        runs = await asyncio.gather(*(gateway.find_training("abc", "owner") for _ in range(50)))
        return gateway.queries, {id(run) for run in runs}

    queries, distinct = asyncio.run(scenario())
    assert queries == 1 and len(distinct) == 1


def test_forgetting_a_training_makes_the_next_request_ask_prefect_again() -> None:
    async def scenario() -> tuple[int, bool]:
        gateway = CountingGateway(cache_s=60)
        first = await gateway.find_training("abc", "owner")
        assert await gateway.find_training("abc", "owner") is first  # cached
        gateway.forget_cached("abc", "owner")  # what cancel and delete do
        second = await gateway.find_training("abc", "owner")
        return gateway.queries, second is first

    queries, same = asyncio.run(scenario())
    assert queries == 2 and not same


def test_an_expired_answer_is_not_served_when_prefect_cannot_be_asked() -> None:
    class DownGateway(CountingGateway):
        async def _read_runs(self, tags: list[str], limit: int) -> list[TrainingRun]:
            if self.queries:
                raise GatewayUnavailable("the orchestrator (Prefect) is unreachable")
            return await super()._read_runs(tags, limit)

    async def scenario() -> None:
        gateway = DownGateway(cache_s=0.05)
        await gateway.find_training("abc", "owner")
        await asyncio.sleep(0.1)
        await gateway.find_training("abc", "owner")

    with pytest.raises(GatewayUnavailable):  # the facade's 503, not a stale status
        asyncio.run(scenario())


def never_composed(training_id: str, run: TrainingRun) -> bytes:
    raise AssertionError("not expected to compose")


def test_a_cached_body_is_served_only_for_the_same_flow_run_state_while_fresh() -> None:
    cache = StatusCache(never_composed, max_age_s=0.2)
    run = a_run()
    cache.put("abc", "owner", run, b'{"status":"success"}', composed_at=time.monotonic())
    assert cache.get("abc", "owner", run) == b'{"status":"success"}'
    assert cache.get("abc", "owner", replace(run)) == b'{"status":"success"}'  # refreshed, unchanged
    assert cache.get("abc", "owner", replace(run, state=StateType.CANCELLING)) is None  # changed: compose afresh
    assert cache.get("abc", "owner", a_run()) is None  # another flow run (a rerun)
    assert cache.get("abc", "someone-else", run) is None
    time.sleep(0.25)
    assert cache.get("abc", "owner", run) is None  # too old: the stage record may have moved on


def test_the_cache_keeps_at_most_its_size_dropping_the_oldest() -> None:
    cache = StatusCache(never_composed, max_entries=3)
    runs = {name: a_run(name) for name in "abcd"}
    for name, run in runs.items():
        cache.put(name, "owner", run, name.encode(), composed_at=time.monotonic())
    assert cache.get("a", "owner", runs["a"]) is None
    assert [cache.get(n, "owner", runs[n]) for n in "bcd"] == [b"b", b"c", b"d"]


def test_an_answer_past_half_its_life_is_served_while_one_query_refreshes_it() -> None:
    async def scenario() -> tuple[int, bool, bool, int]:
        gateway = CountingGateway(cache_s=0.4)
        first = await gateway.find_training("abc", "owner")
        await asyncio.sleep(0.25)  # past half its life, still fresh
        during = await asyncio.gather(*(gateway.find_training("abc", "owner") for _ in range(20)))
        served_old = all(run is first for run in during)
        await asyncio.sleep(0.1)  # the background query (0.05 s) has replaced it
        refreshed = gateway.cached_training("abc", "owner")
        return gateway.queries, served_old, refreshed is not None and refreshed is not first, len(gateway._pending)

    queries, served_old, refreshed, pending = asyncio.run(scenario())
    assert queries == 2 and served_old and refreshed and pending == 0


def test_a_query_begun_before_a_cancel_does_not_refill_the_cache() -> None:
    async def scenario() -> tuple[TrainingRun | None, int]:
        gateway = CountingGateway(cache_s=60)
        under_way = asyncio.ensure_future(gateway.find_training("abc", "owner"))
        await asyncio.sleep(0.01)
        gateway.forget_cached("abc", "owner")  # the cancel happens while Prefect is being asked
        await under_way
        return gateway.cached_training("abc", "owner"), gateway.queries

    cached, queries = asyncio.run(scenario())
    assert cached is None and queries == 1


class CountingComposer:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, training_id: str, run: TrainingRun) -> bytes:
        self.calls += 1
        time.sleep(0.05)  # store reads and signing, in a worker thread
        return b'{"n":%d}' % self.calls


def test_concurrent_misses_share_one_composition_and_keep_it() -> None:
    composer = CountingComposer()

    async def scenario() -> tuple[list[bytes], bytes | None, bytes]:
        cache, run = StatusCache(composer), a_run()
        bodies = await asyncio.gather(*(cache.body("abc", "owner", run) for _ in range(50)))
        changed = replace(run, state=StateType.CANCELLED)
        return bodies, cache.get("abc", "owner", run), await cache.body("abc", "owner", changed)

    bodies, kept, recomposed = asyncio.run(scenario())
    assert set(bodies) == {b'{"n":1}'} and kept == b'{"n":1}'
    assert recomposed == b'{"n":2}' and composer.calls == 2


def test_a_body_past_half_its_age_is_served_while_one_composition_replaces_it() -> None:
    composer = CountingComposer()

    async def scenario() -> tuple[set[bytes], bytes | None, int]:
        cache, run = StatusCache(composer, max_age_s=0.4), a_run()
        await cache.body("abc", "owner", run)
        await asyncio.sleep(0.25)
        served = {cache.answer("abc", "owner", replace(run)) for _ in range(20)}  # none waits
        await asyncio.sleep(0.1)
        return served, cache.get("abc", "owner", run), composer.calls

    served, replaced, calls = asyncio.run(scenario())
    assert served == {b'{"n":1}'} and replaced == b'{"n":2}' and calls == 2
