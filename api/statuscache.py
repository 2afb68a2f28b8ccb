"""Composed status answers, reused while the gateway's view of the training is unchanged.

Many clients poll one training. The gateway already answers `find_training` from a short-lived
cache; a status composed from one such answer (plus the store's stage record and manifest, and
signed links) is reused as long as the gateway hands back that same answer object. When the
gateway refreshes, or forgets the training on cancel/delete, a new object comes back and the
status is composed afresh, so answers are never staler than the gateway's own cache. Requests
that find no body for the gateway's newest answer together share one composition.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

from api.gateway import TrainingRun

MAX_ENTRIES = 10_000
Key = tuple[str, str]


class StatusCache:
    """(training id, owner) -> (the gateway's run object, the serialized status body)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: dict[Key, tuple[TrainingRun, bytes]] = {}
        self._composing: dict[Key, tuple[TrainingRun, asyncio.Future[bytes]]] = {}
        self._max = max_entries

    def get(self, training_id: str, owner: str, run: TrainingRun) -> bytes | None:
        entry = self._entries.get((training_id, owner))
        return entry[1] if entry is not None and entry[0] is run else None

    def put(self, training_id: str, owner: str, run: TrainingRun, body: bytes) -> None:
        key = (training_id, owner)
        self._entries.pop(key, None)
        while len(self._entries) >= self._max:
            del self._entries[next(iter(self._entries))]  # the oldest entry
        self._entries[key] = (run, body)

    async def body(self, training_id: str, owner: str, run: TrainingRun,
                   compose: Callable[[], Awaitable[bytes]]) -> bytes:
        """The cached body for ``run``, else ``compose()``'s, shared with concurrent callers and kept."""
        cached = self.get(training_id, owner, run)
        if cached is not None:
            return cached
        key = (training_id, owner)
        composing = self._composing.get(key)
        if composing is None or composing[0] is not run:
            future = asyncio.ensure_future(compose())
            composing = self._composing[key] = (run, future)
            future.add_done_callback(functools.partial(self._composed, key, run))
        return await asyncio.shield(composing[1])  # a client that leaves does not cancel it for the rest

    def _composed(self, key: Key, run: TrainingRun, future: asyncio.Future[bytes]) -> None:
        if self._composing.get(key, (None,))[0] is run:
            del self._composing[key]
        if not future.cancelled() and future.exception() is None:
            self.put(*key, run, future.result())
