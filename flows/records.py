"""Storage layout of a training and the small JSON records the pipeline publishes (SPEC §4).

``trainings/<id>/status.json`` is the pipeline's own account of where it is (stage, step, rate);
``trainings/<id>/manifest.json`` is written last and makes a model complete. Light module: the
facade reads these, the worker writes them.
"""

from __future__ import annotations

import json
import time

from pydantic import BaseModel, Field

from flows.params import StageRecord
from flows.store import ObjectNotFound, ObjectStore

LOG_LINES_KEPT = 50


APP_TAG = "dreamflow"  # every training's flow run carries it, with training:<id> and owner:<key hash>


def training_tag(training_id: str) -> str:
    return f"training:{training_id}"


OWNER_TAG_PREFIX = "owner:"


def owner_tag(owner: str) -> str:
    return f"{OWNER_TAG_PREFIX}{owner}"


DELETED_TAG_PREFIX = "deleted-owner:"  # replaces owner:<hash> on a deleted training's flow run


def as_deleted(tags: list[str]) -> list[str]:
    """A training run's tags once its owner deleted it: ``owner:<hash>`` becomes ``deleted-owner:<hash>``
    (out of the owner's list and status; the run stays in Prefect's record)."""
    return [DELETED_TAG_PREFIX + tag.removeprefix(OWNER_TAG_PREFIX) if tag.startswith(OWNER_TAG_PREFIX) else tag
            for tag in tags]


def tagged_owners(tags: list[str]) -> set[str]:
    """The owners a training run is tagged with, deleted or not."""
    return {tag.removeprefix(prefix) for tag in tags for prefix in (OWNER_TAG_PREFIX, DELETED_TAG_PREFIX)
            if tag.startswith(prefix)}


def is_deleted(tags: list[str]) -> bool:
    return any(tag.startswith(DELETED_TAG_PREFIX) for tag in tags)


def training_prefix(training_id: str) -> str:
    return f"trainings/{training_id}/"


def status_key(training_id: str) -> str:
    return f"{training_prefix(training_id)}status.json"


def manifest_key(training_id: str) -> str:
    return f"{training_prefix(training_id)}manifest.json"


class StoredFile(BaseModel):
    """One artifact in the store."""

    key: str
    size: int
    sha256: str


class Manifest(BaseModel):
    """The record that makes a model complete; written after every file it names."""

    training_id: str
    owner: str
    method: str
    base_model_id: str
    family: str
    instance_prompt: str
    parameters: dict[str, object] = Field(default_factory=dict)
    files: dict[str, StoredFile] = Field(default_factory=dict)
    samples: list[StoredFile] = Field(default_factory=list)
    final_loss: float | None = None
    steps: int = 0
    resumed_from: int | None = Field(None, description="Checkpoint step the final attempt resumed from.")
    trained_between: tuple[float, float] | None = Field(None, description="Unix times the GPU slot was held.")
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    created_at: float = 0.0


def read_stage(store: ObjectStore, training_id: str) -> StageRecord | None:
    """The latest published stage record, or None before the pipeline wrote one."""
    try:
        return StageRecord.model_validate_json(store.get_bytes(status_key(training_id)))
    except ObjectNotFound:
        return None


def write_stage(store: ObjectStore, training_id: str, record: StageRecord, line: str | None = None) -> StageRecord:
    """Publish ``record`` (with ``line`` appended to its log) and return what was written."""
    log = [*record.log, line][-LOG_LINES_KEPT:] if line else record.log
    stamped = record.model_copy(update={"log": log, "updated_at": time.time()})
    store.put_bytes(status_key(training_id), stamped.model_dump_json().encode(), "application/json")
    return stamped


def read_manifest(store: ObjectStore, training_id: str) -> Manifest | None:
    """The model's manifest, or None while the model is incomplete."""
    try:
        return Manifest.model_validate_json(store.get_bytes(manifest_key(training_id)))
    except ObjectNotFound:
        return None


def write_manifest(store: ObjectStore, manifest: Manifest) -> None:
    """Write the manifest: the last object of a training."""
    body = json.dumps(manifest.model_dump(mode="json"), indent=2).encode()
    store.put_bytes(manifest_key(manifest.training_id), body, "application/json")
