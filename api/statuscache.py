"""Composed status answers, reused while the training's flow run is unchanged and the body is fresh.

Many clients poll one training. The gateway answers `find_training` from a short-lived cache; a
status composed from one such answer (plus the store's stage record and manifest, and signed
links) is served while the gateway's answer equals the one it was composed from and the body is
younger than ``max_age_s``. Past :data:`~api.gateway.REFRESH_AHEAD` of that age one background
composition replaces it while it is still served, so pollers do not wait for the store. A changed
flow run (a new state, a cancel, a delete) is never answered with an old body: those requests
wait for a new one, and requests waiting together share one composition.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

from api.gateway import REFRESH_AHEAD, STATUS_CACHE_S, TrainingRun

MAX_ENTRIES = 10_000
Key = tuple[str, str]
Compose = Callable[[str, TrainingRun], bytes]  # (training id, run) -> the serialized status; blocking


class StatusCache:
    """(training id, owner) -> (the run it was composed from, when, the serialized status body)."""

    def __init__(self, compose: Compose, max_age_s: float = STATUS_CACHE_S, max_entries: int = MAX_ENTRIES) -> None:
        self._compose = compose
        self._max_age = max_age_s
        self._max = max_entries
        self._entries: dict[Key, tuple[TrainingRun, float, bytes]] = {}
        self._composing: dict[Key, tuple[TrainingRun, asyncio.Future[bytes]]] = {}

    def get(self, training_id: str, owner: str, run: TrainingRun) -> bytes | None:
        """The body composed from this run's state, while fresh; None otherwise. Never waits."""
        entry = self._entries.get((training_id, owner))
        if entry is None or not (entry[0] is run or entry[0] == run):
            return None
        return entry[2] if time.monotonic() - entry[1] < self._max_age else None

    def answer(self, training_id: str, owner: str, run: TrainingRun) -> bytes | None:
        """:meth:`get`, starting a background composition when the body is past its refresh age."""
        entry = self._entries.get((training_id, owner))
        body = self.get(training_id, owner, run)
        if body is not None and entry is not None and time.monotonic() - entry[1] >= self._max_age * REFRESH_AHEAD:
            self._start(training_id, owner, run)
        return body

    async def body(self, training_id: str, owner: str, run: TrainingRun) -> bytes:
        """The fresh body for ``run``, else a new one (composed once for all concurrent callers)."""
        body = self.answer(training_id, owner, run)
        if body is not None:
            return body
        return await asyncio.shield(self._start(training_id, owner, run))  # one client leaving cancels nothing

    def put(self, training_id: str, owner: str, run: TrainingRun, body: bytes, composed_at: float) -> None:
        key = (training_id, owner)
        self._entries.pop(key, None)
        while len(self._entries) >= self._max:
            del self._entries[next(iter(self._entries))]  # the oldest entry
        self._entries[key] = (run, composed_at, body)

    def _start(self, training_id: str, owner: str, run: TrainingRun) -> asyncio.Future[bytes]:
        key = (training_id, owner)
        composing = self._composing.get(key)
        if composing is None or not (composing[0] is run or composing[0] == run):
            future = asyncio.ensure_future(asyncio.to_thread(self._compose, training_id, run))
            composing = self._composing[key] = (run, future)
            future.add_done_callback(functools.partial(self._composed, key, run, time.monotonic()))
        return composing[1]

    def _composed(self, key: Key, run: TrainingRun, started: float, future: asyncio.Future[bytes]) -> None:
        if self._composing.get(key, (None,))[0] is run:
            del self._composing[key]
        if future.cancelled() or future.exception() is not None:  # a failure reaches its waiters only
            return
        entry = self._entries.get(key)
        if entry is None or entry[1] <= started:  # never over a body composed later
            self.put(*key, run, future.result(), composed_at=started)
