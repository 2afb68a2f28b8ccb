"""One slot of the GPU's global concurrency limit in Prefect, held with a renewed lease.

Prefect's own ``concurrency()`` does the same, but through a client that waits 2 s (then 4, 8...)
after a 503. The embedded Prefect server (SQLite) answers 503 to a slot request when another write
landed between the request's read and its write (SQLITE_BUSY_SNAPSHOT). Right after a flow's first
tasks end, while the server records their states and logs, that happened to about half the warm
jobs on the 2-core machine, and each cost the job 2 s: the client pauses after a 503 even with its
retries switched off (flows/prefect_once.py). A 503 means the server rolled the request back, so
asking again at once is safe: here the client sends once, and the retries start at 10 ms.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx

from flows.prefect_once import BUSY_STATUS, sync_client_once

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.01  # a 503 is a lost race that is over: ask again almost at once (then 20, 40 ms...)
RETRY_MAX_S = 2.0
UNREACHABLE_LIMIT_S = 120.0  # how long the server may fail every request before the task fails
BUSY_RETRY_S = 1.0  # when the server names no Retry-After for a limit with no free slot


@dataclass
class HeldSlot:
    """What ``gpu_slot`` yields."""

    waited_s: float  # from asking for the slot to holding it
    prepared: Any = None  # what ``meanwhile`` returned
    meanwhile_s: float = 0.0  # how long ``meanwhile`` ran


class SlotAbandoned(Exception):
    """The slot request was given up: the work meant to run in it failed first."""


@contextmanager
def gpu_slot(limit: str, lease_s: float, meanwhile: Callable[[], Any] | None = None) -> Iterator[HeldSlot]:
    """Hold one slot of the global concurrency limit ``limit`` (waiting as long as all are taken).
    A process that dies stops renewing, so its slot frees itself within ``lease_s``. Without such a
    limit in Prefect, nothing is held.

    ``meanwhile`` runs on this thread while the request is out (and while it waits for a free slot),
    for the work that needs no GPU; its result is the slot's ``prepared``. If it raises, the request
    is given up, a slot already granted is given back, and its error propagates.
    """
    from prefect.concurrency._leases import maintain_concurrency_lease

    with sync_client_once() as client:
        lease_id, slot = _acquire_while(client, limit, lease_s, meanwhile or (lambda: None))
        if lease_id is None:
            log.warning("no concurrency limit %r in Prefect: training without a GPU slot", limit)
            yield slot
            return
        try:
            with maintain_concurrency_lease(lease_id, lease_s, raise_on_lease_renewal_failure=False):
                yield slot
        finally:
            _release(client, lease_id)


def _acquire_while(
    client: Any, limit: str, lease_s: float, meanwhile: Callable[[], Any]
) -> tuple[UUID | None, HeldSlot]:
    """Ask for the slot on a thread of its own while ``meanwhile()`` runs here (torch runs its CPU
    work fastest on the main thread); both must end before the training starts."""
    holder, stop, started = _holder(), threading.Event(), time.monotonic()

    def acquire() -> tuple[UUID | None, float]:
        lease_id = _acquire(client, limit, lease_s, holder, stop)
        return lease_id, time.monotonic() - started

    with ThreadPoolExecutor(1, thread_name_prefix="gpu-slot") as pool:
        acquiring = pool.submit(contextvars.copy_context().run, acquire)
        try:
            prepared = meanwhile()
            meanwhile_s = time.monotonic() - started
        except BaseException:
            stop.set()
            if acquiring.exception() is None and (lease_id := acquiring.result()[0]) is not None:
                _release(client, lease_id)
            raise
        lease_id, waited = acquiring.result()
    return lease_id, HeldSlot(waited, prepared, meanwhile_s)


def _acquire(client: Any, limit: str, lease_s: float, holder: object | None, stop: threading.Event) -> UUID | None:
    def request() -> httpx.Response:
        return client.increment_concurrency_slots_with_lease(
            names=[limit], slots=1, mode="concurrency", lease_duration=lease_s, holder=holder,
        )

    while True:
        try:
            body = _call(request, stop).json()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 423:  # 423: every slot is taken
                raise
            _pause(float(exc.response.headers.get("Retry-After") or BUSY_RETRY_S), stop)
            continue
        return UUID(body["lease_id"]) if body.get("limits") else None


def _release(client: Any, lease_id: UUID) -> None:
    _call(lambda: client.release_concurrency_slots_with_lease(lease_id=lease_id), threading.Event())


def _call(send: Callable[[], httpx.Response], stop: threading.Event) -> httpx.Response:
    """``send()`` (on a client that sends once), retried here from 10 ms up on 502/503/504 and lost
    connections, for at most UNREACHABLE_LIMIT_S; other errors raise."""
    delay, deadline = RETRY_FIRST_S, time.monotonic() + UNREACHABLE_LIMIT_S
    while True:
        try:
            return send()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code not in BUSY_STATUS or time.monotonic() > deadline:
                raise
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        _pause(delay, stop)
        delay = min(delay * 2, RETRY_MAX_S)


def _pause(seconds: float, stop: threading.Event) -> None:
    """Wait ``seconds`` before asking again, unless the request was given up."""
    if stop.wait(seconds):
        raise SlotAbandoned("the GPU slot request was given up")


def _holder() -> object | None:
    """The task run holding the slot, as the Prefect UI lists it."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    return ConcurrencyLeaseHolder(type="task_run", id=context.task_run.id) if context else None
