"""The stack's Prefect server names a short retry time in its busy (503) answers, so Prefect's own
clients ask again within milliseconds instead of backing off 2 s (real server, real SQLite lock)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_CLIENT_RETRY_JITTER_FACTOR,
    temporary_settings,
)
from sqlitelock import HOLD_S, concurrency_limit, write_while_holding_the_lock
from stackserver import RunningStack

from deployments.prefect_server import BusyRetryAfter


def call(app: BusyRetryAfter, status: int, client: tuple[str, int] = ("127.0.0.1", 50000), body: bytes = b"{}",
         headers: list[tuple[bytes, bytes]] | None = None, kind: str = "http") -> list[dict]:
    """One POST of ``body`` from ``client`` through the middleware to an app that reads it and answers
    ``status``; the messages sent back."""

    async def inner(scope, receive, send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": headers or []})
        await send({"type": "http.response.body", "body": b"{}"})

    app.app = inner
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": kind, "client": client, "method": "POST", "path": "/api/flow_runs/x/set_state", "query_string": b""}
    asyncio.run(app(scope, receive, send))
    return sent


def retry_after(messages: list[dict]) -> str | None:
    headers = dict(messages[0]["headers"])
    return headers[b"retry-after"].decode() if b"retry-after" in headers else None


def test_a_busy_answer_names_a_short_wait_that_grows_while_the_same_request_keeps_meeting_them() -> None:
    now = [100.0]
    app = BusyRetryAfter(None, clock=lambda: now[0])  # type: ignore[arg-type]
    # Prefect's client asks again on a new connection: a retry is the same request from the same address.
    assert [retry_after(call(app, 503, client=("127.0.0.1", 50000 + n))) for n in range(7)] == [
        "0.050", "0.200", "0.800", "3.200", "12.800", "30.000", "30.000"]
    assert retry_after(call(app, 503, body=b'{"other": 1}')) == "0.050"  # another request: its own count
    assert retry_after(call(app, 200)) is None
    assert retry_after(call(app, 503)) == "0.050"  # the request went through: it starts again
    now[0] += 61
    assert retry_after(call(app, 503, body=b'{"other": 1}')) == "0.050"  # asked again after a minute: a new request


def test_other_answers_and_a_wait_the_app_named_pass_unchanged() -> None:
    app = BusyRetryAfter(None)  # type: ignore[arg-type]
    assert retry_after(call(app, 500)) is None
    assert call(app, 503, headers=[(b"Retry-After", b"7")])[0]["headers"] == [(b"Retry-After", b"7")]
    assert retry_after(call(app, 503, kind="websocket")) is None  # only HTTP answers are looked at


@pytest.fixture
def limit(stack: RunningStack) -> Iterator[str]:
    with concurrency_limit(stack, 5, "test-busy") as name:
        yield name


def test_a_prefect_client_that_meets_a_busy_database_asks_again_at_once(stack: RunningStack, limit: str) -> None:
    """A write that meets SQLite's lock held by another writer gets 503 with a Retry-After of 50 ms
    (then 0.2, 0.8 s...); Prefect's client (its own retries on, as the worker and the flow engine
    use it) asks again then, not after 2 s."""
    statuses: list[tuple[int, str | None]] = []
    sent_at: list[float] = []  # when each request went out
    answered_at: list[float] = []  # when each answer came back

    def send(request: httpx.Request) -> None:
        sent_at.append(time.monotonic())

    def record(response: httpx.Response) -> None:
        answered_at.append(time.monotonic())
        statuses.append((response.status_code, response.headers.get("retry-after")))

    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api}):
        for hold_s in HOLD_S:  # the request must read before the lock's holder commits; slow machines need longer
            for times in (statuses, sent_at, answered_at):
                times.clear()
            committer = write_while_holding_the_lock(
                stack, "UPDATE concurrency_limit_v2 SET updated = updated WHERE name = ?", (limit,), hold_s)
            with get_client(sync_client=True) as client:
                client._client.event_hooks["request"].append(send)
                client._client.event_hooks["response"].append(record)
                lease = client.increment_concurrency_slots_with_lease(
                    names=[limit], slots=1, mode="concurrency", lease_duration=60)
                client.release_concurrency_slots_with_lease(lease_id=lease.json()["lease_id"])
            committer.join()
            if any(status == 503 for status, _ in statuses):
                break
    busy = [after for status, after in statuses if status == 503]
    assert busy, f"no 503 in {len(HOLD_S)} tries: {statuses}"
    assert busy == ["0.050", "0.200", "0.800", "3.200", "12.800"][: len(busy)]
    assert statuses[-2][0] == 200  # the slot request, granted on a later try (then the release)
    # Each busy answer was followed by the next try after the wait it named, not after Prefect's own
    # back-off (2 s, then 4 s..., give or take 30 %). How many busy answers there are depends on when
    # the lock's holder commits on this machine; the waits between them do not. The client waits at
    # least the named time, and up to its jitter factor longer.
    jitter = PREFECT_CLIENT_RETRY_JITTER_FACTOR.value()
    waits = [sent_at[n + 1] - answered_at[n] for n, (status, _) in enumerate(statuses) if status == 503]
    for wait, named in zip(waits, busy, strict=True):
        assert float(named) - 0.01 <= wait < float(named) * (1 + jitter) + 0.5, (waits, busy)
    assert waits[0] < 1.0  # Prefect's own first back-off: 2 s less at most 30 %
