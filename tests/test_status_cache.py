"""The facade's status answers under many pollers: one Prefect query per refresh, reused bodies.

These exercise the gateway's and the status cache's own logic in-process; the Prefect query is
replaced by a counting coroutine (the end-to-end and contract tests cover the real one).
"""

from __future__ import annotations

import asyncio
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


def test_a_cached_body_is_served_only_for_the_same_gateway_answer() -> None:
    cache = StatusCache()
    run = a_run()
    cache.put("abc", "owner", run, b'{"status":"success"}')
    assert cache.get("abc", "owner", run) == b'{"status":"success"}'
    assert cache.get("abc", "owner", a_run()) is None  # the gateway refreshed: compose afresh
    assert cache.get("abc", "someone-else", run) is None


def test_the_cache_keeps_at_most_its_size_dropping_the_oldest() -> None:
    cache = StatusCache(max_entries=3)
    runs = {name: a_run(name) for name in "abcd"}
    for name, run in runs.items():
        cache.put(name, "owner", run, name.encode())
    assert cache.get("a", "owner", runs["a"]) is None
    assert [cache.get(n, "owner", runs[n]) for n in "bcd"] == [b"b", b"c", b"d"]
