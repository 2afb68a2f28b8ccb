"""Contention on the stack's real Prefect database: a second SQLite writer, as Prefect's own
services and other flow runs are under load.

Prefect on SQLite opens a write as a deferred transaction: it reads, then asks for the write lock.
When another connection holds the lock and commits a change meanwhile, the waiting request's view
is stale and SQLite refuses it (SQLITE_BUSY_SNAPSHOT); Prefect answers 503. Holding the lock and
committing a write is how these tests make the server answer 503 for real.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from stackserver import RunningStack

HOLD_S = (1.0, 2.0, 4.0)
"""How long a test keeps the write lock, tried in turn until its request met it: the request must
read before the lock's holder commits, and a busy machine may be slow to send it."""


@contextmanager
def concurrency_limit(stack: RunningStack, slots: int, prefix: str) -> Iterator[str]:
    """A global concurrency limit of the test's own (trainings of other tests use theirs); its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    api = stack.settings.prefect_api
    httpx.post(f"{api}/v2/concurrency_limits/", json={"name": name, "limit": slots}, timeout=10).raise_for_status()
    try:
        yield name
    finally:
        httpx.delete(f"{api}/v2/concurrency_limits/{name}", timeout=10)


def prefect_database(stack: RunningStack) -> sqlite3.Connection:
    database = stack.settings.resolved_data_dir / "prefect" / "prefect.db"
    return sqlite3.connect(database, isolation_level=None, check_same_thread=False, timeout=30)


def hold_and_write(connection: sqlite3.Connection, statement: str, args: tuple[object, ...]) -> None:
    connection.execute("BEGIN IMMEDIATE")
    connection.execute(statement, args)


def keep_writing(stack: RunningStack, statement: str, args: tuple[object, ...], hold_s: float,
                 until: threading.Event) -> threading.Thread:
    """Hold the lock ``hold_s``, commit a write, take the lock again at once; until ``until`` is set.

    The lock is held now, when this returns (so a request made next must wait for it)."""
    connection = prefect_database(stack)
    hold_and_write(connection, statement, args)

    def cycle() -> None:
        while True:
            time.sleep(hold_s)
            connection.execute("COMMIT")
            if until.is_set():
                break
            hold_and_write(connection, statement, args)
        connection.close()

    thread = threading.Thread(target=cycle)
    thread.start()
    return thread


def write_while_holding_the_lock(stack: RunningStack, statement: str, args: tuple[object, ...],
                                 hold_s: float) -> threading.Thread:
    """Take the write lock now, run ``statement``, and commit after ``hold_s`` (in a thread): one cycle."""
    once = threading.Event()
    once.set()
    return keep_writing(stack, statement, args, hold_s, once)
