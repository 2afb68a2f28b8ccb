"""Composed status answers, reused while the gateway's view of the training is unchanged.

Many clients poll one training. The gateway already answers `find_training` from a short-lived
cache; a status composed from one such answer (plus the store's stage record and manifest, and
signed links) is reused as long as the gateway hands back that same answer object. When the
gateway refreshes, or forgets the training on cancel/delete, a new object comes back and the
status is composed afresh, so answers are never staler than the gateway's own cache.
"""

from __future__ import annotations

from api.gateway import TrainingRun

MAX_ENTRIES = 10_000


class StatusCache:
    """(training id, owner) -> (the gateway's run object, the serialized status body)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: dict[tuple[str, str], tuple[TrainingRun, bytes]] = {}
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
