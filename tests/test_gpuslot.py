"""The GPU slot (tasks/gpuslot.py) against the stack's real Prefect server on SQLite: a slot request
that the server answers 503, because another write landed while it waited for SQLite's write
lock, is asked again at once and granted; the slot is held while the block runs and freed after."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from sqlitelock import HOLD_S, concurrency_limit, write_while_holding_the_lock
from stackserver import RunningStack

from tasks import gpuslot


@pytest.fixture
def limit(stack: RunningStack) -> Iterator[str]:
    """A one-slot global concurrency limit of this test's own."""
    with concurrency_limit(stack, 1, "test-slot") as name:
        yield name


def active_slots(stack: RunningStack, name: str) -> int:
    response = httpx.get(f"{stack.settings.prefect_api}/v2/concurrency_limits/{name}", timeout=10)
    response.raise_for_status()
    return int(response.json()["active_slots"])


def test_a_503_from_a_busy_sqlite_is_retried_at_once_and_the_slot_is_held_then_freed(
    stack: RunningStack, limit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    retries: list[float] = []  # the pauses gpuslot takes before asking again
    monkeypatch.setattr(gpuslot, "time", SimpleNamespace(
        monotonic=time.monotonic, sleep=lambda seconds: (retries.append(seconds), time.sleep(seconds))))

    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api}):
        for hold_s in HOLD_S:  # the server must read before the commit; a busy machine may be slow to
            retries.clear()
            committer = write_while_holding_the_lock(
                stack, "UPDATE concurrency_limit_v2 SET updated = updated WHERE name = ?", (limit,), hold_s)
            with gpuslot.gpu_slot(limit, 60) as waited:
                held = active_slots(stack, limit)
            committer.join()
            assert held == 1 and active_slots(stack, limit) == 0
            if retries:
                break
    # The request waited for the lock, got its 503 when the lock's holder committed, and was asked
    # again after 10 ms, not after the 2 s Prefect's own client waits.
    assert retries[0] == gpuslot.RETRY_FIRST_S, f"no 503 in {len(HOLD_S)} tries"
    assert waited >= hold_s


def test_a_limit_that_does_not_exist_holds_nothing(stack: RunningStack) -> None:
    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api}):
        with gpuslot.gpu_slot(f"no-such-limit-{uuid.uuid4().hex[:8]}", 60):
            pass  # no error: a stack without the GPU limit trains without a slot, as Prefect's concurrency() does
