"""The GPU slot (tasks/gpuslot.py) against the stack's real Prefect server on SQLite: a slot request
that the server answers 503, because another write landed while it waited for SQLite's write
lock, is asked again at once and granted; the slot is held while the block runs and freed after."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

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
    pause = gpuslot._pause
    monkeypatch.setattr(gpuslot, "_pause", lambda seconds, stop: (retries.append(seconds), pause(seconds, stop)))

    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api}):
        for hold_s in HOLD_S:  # the server must read before the commit; a busy machine may be slow to
            retries.clear()
            committer = write_while_holding_the_lock(
                stack, "UPDATE concurrency_limit_v2 SET updated = updated WHERE name = ?", (limit,), hold_s)
            with gpuslot.gpu_slot(limit, 60) as slot:
                held = active_slots(stack, limit)
            committer.join()
            assert held == 1 and active_slots(stack, limit) == 0
            if retries:
                break
    # The request waited for the lock, got its 503 when the lock's holder committed, and was asked
    # again after 10 ms, not after the 2 s Prefect's own client waits.
    assert retries[0] == gpuslot.RETRY_FIRST_S, f"no 503 in {len(HOLD_S)} tries"
    assert slot.waited_s >= hold_s


def test_a_limit_that_does_not_exist_holds_nothing(stack: RunningStack) -> None:
    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api}):
        with gpuslot.gpu_slot(f"no-such-limit-{uuid.uuid4().hex[:8]}", 60):
            pass  # no error: a stack without the GPU limit trains without a slot, as Prefect's concurrency() does


def taken_by_someone_else(stack: RunningStack, name: str) -> str:
    """Take the limit's one slot with a lease of another holder; the lease id."""
    response = httpx.post(f"{stack.settings.prefect_api}/v2/concurrency_limits/increment-with-lease", json={
        "names": [name], "slots": 1, "mode": "concurrency", "lease_duration": 60}, timeout=10)
    response.raise_for_status()
    return str(response.json()["lease_id"])


def give_back(stack: RunningStack, lease_id: str) -> None:
    httpx.post(f"{stack.settings.prefect_api}/v2/concurrency_limits/decrement-with-lease",
               json={"lease_id": lease_id}, timeout=10).raise_for_status()


def test_the_work_meant_for_the_wait_runs_while_the_slot_is_taken_and_comes_back_with_it(
    stack: RunningStack, limit: str
) -> None:
    other = taken_by_someone_else(stack, limit)
    freed_at: list[float] = []

    def free_it_later() -> None:
        time.sleep(1.5)
        freed_at.append(time.monotonic())
        give_back(stack, other)

    freeing = threading.Thread(target=free_it_later)
    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api}):
        freeing.start()
        asked = time.monotonic()
        with gpuslot.gpu_slot(limit, 60, meanwhile=lambda: (time.sleep(0.5), "prepared")[1]) as slot:
            held_at = time.monotonic()
            assert active_slots(stack, limit) == 1  # ours: the other holder gave its slot back
        freeing.join()
    assert slot.prepared == "prepared"
    # The preparation ran inside the wait for the slot, not before it and not after it.
    assert 0.5 <= slot.meanwhile_s < freed_at[0] - asked <= slot.waited_s <= held_at - asked
    assert active_slots(stack, limit) == 0


def test_work_that_fails_while_the_slot_is_taken_gives_the_request_up(stack: RunningStack, limit: str) -> None:
    def bad_image() -> None:
        raise RuntimeError("bad image")

    other = taken_by_someone_else(stack, limit)  # the slot stays taken: only giving up ends the request
    try:
        with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api}):
            started = time.monotonic()
            with pytest.raises(RuntimeError, match="bad image"), gpuslot.gpu_slot(limit, 60, meanwhile=bad_image):
                pytest.fail("the block ran without its preparation")
            gave_up_s = time.monotonic() - started
        assert gave_up_s < gpuslot.BUSY_RETRY_S + 1.0  # at the next retry at the latest, not at the slot's freeing
        assert active_slots(stack, limit) == 1  # the other holder's only
    finally:
        give_back(stack, other)


def test_work_that_fails_after_the_slot_was_granted_gives_the_slot_back(stack: RunningStack, limit: str) -> None:
    seen_while_preparing: list[int] = []

    def prepare_then_fail() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen_while_preparing.append(active_slots(stack, limit))  # the slot, granted while this runs
            if seen_while_preparing[-1] == 1:
                break
            time.sleep(0.05)
        raise RuntimeError("out of memory")

    with (
        temporary_settings({PREFECT_API_URL: stack.settings.prefect_api}),
        pytest.raises(RuntimeError, match="out of memory"),
        gpuslot.gpu_slot(limit, 60, meanwhile=prepare_then_fail),
    ):
        pytest.fail("the block ran without its preparation")
    assert seen_while_preparing[-1] == 1, "the slot was not asked for while the preparation ran"
    assert active_slots(stack, limit) == 0
