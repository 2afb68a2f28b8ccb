"""Scheduled retraining: hash a dataset folder in the store, compare it with the model's last
version, publish a new version under ``models/<name>/v<N>/`` and keep the last K versions.

Layout of a named model::

    models/<name>/v<N>/manifest.json     the training's manifest, keys pointing at the copies below
    models/<name>/v<N>/export/...        copies of the exported model files
    models/<name>/v<N>/samples/...       copies of the sample images
    models/<name>/latest.json            written last: version, dataset hash, training id
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict

from flows.records import Manifest, StoredFile, read_manifest, training_prefix
from flows.store import ObjectNotFound, ObjectStore
from tasks.context import run_logger, worker_store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TRAINING_ID_MAX = 32  # TrainingParams.training_id max_length
_VERSION_FOLDER = re.compile(r"^v(\d+)/")


class EmptyDataset(RuntimeError):
    """The dataset folder holds no images."""


class TrainingIncomplete(RuntimeError):
    """The training finished without a manifest, so there is nothing to publish."""


class DatasetSnapshot(BaseModel):
    """The image set of a dataset folder and its content hash."""

    model_config = ConfigDict(frozen=True)

    image_keys: list[str]
    digest: str


class ModelVersion(BaseModel):
    """``models/<name>/latest.json``: the newest published version of a named model."""

    model_name: str
    version: int
    dataset_hash: str
    training_id: str
    images: int
    created_at: float = 0.0


class RetrainPlan(BaseModel):
    """What a retraining run does: nothing (``changed`` False), or train ``version`` as ``training_id``."""

    model_config = ConfigDict(frozen=True)

    changed: bool
    version: int
    training_id: str
    message: str


def model_prefix(model_name: str) -> str:
    return f"models/{model_name}/"


def latest_key(model_name: str) -> str:
    return f"{model_prefix(model_name)}latest.json"


def version_prefix(model_name: str, version: int) -> str:
    return f"{model_prefix(model_name)}v{version}/"


def version_training_id(model_name: str, version: int) -> str:
    """``<name>-v<N>`` as a training id: letters, digits and dashes, at most 32 characters.

    A name too long to fit is cut and given a short hash of the whole name, so two long names
    that share a beginning still get different ids.
    """
    suffix = f"-v{version}"
    base = re.sub(r"[^A-Za-z0-9-]+", "-", model_name).strip("-") or "model"
    if len(base) + len(suffix) > TRAINING_ID_MAX:
        tag = hashlib.sha256(model_name.encode()).hexdigest()[:6]
        base = f"{base[:TRAINING_ID_MAX - len(suffix) - len(tag) - 1].rstrip('-')}-{tag}"
    return f"{base}{suffix}"


def dataset_digest(store: ObjectStore, keys: list[str]) -> str:
    """sha256 over the sorted (key, sha256 of the object's bytes) pairs: renames and edits both count."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        content = hashlib.sha256(store.get_bytes(key)).hexdigest()
        digest.update(f"{key}\0{content}\n".encode())
    return digest.hexdigest()


@task(name="hash-dataset", retries=3, retry_delay_seconds=[2, 5, 15])
def hash_dataset(dataset_prefix: str) -> DatasetSnapshot:
    """List the images under ``dataset_prefix`` and hash their content."""
    store = worker_store()
    keys = [k for k in store.list(dataset_prefix) if k.lower().endswith(IMAGE_SUFFIXES)]
    if not keys:
        raise EmptyDataset(f"no images under {dataset_prefix!r} (expected {', '.join(IMAGE_SUFFIXES)} files)")
    snapshot = DatasetSnapshot(image_keys=keys, digest=dataset_digest(store, keys))
    run_logger().info("dataset %s: %d images, sha256 %s", dataset_prefix, len(keys), snapshot.digest[:12])
    return snapshot


def read_latest(store: ObjectStore, model_name: str) -> ModelVersion | None:
    """The model's newest published version, or None before the first one."""
    try:
        return ModelVersion.model_validate_json(store.get_bytes(latest_key(model_name)))
    except ObjectNotFound:
        return None


@task(name="compare-with-latest", retries=3, retry_delay_seconds=[2, 5, 15])
def compare_with_latest(model_name: str, snapshot: DatasetSnapshot) -> RetrainPlan:
    """Decide whether the dataset changed since the model's last version, and name the next one."""
    latest = read_latest(worker_store(), model_name)
    if latest is not None and latest.dataset_hash == snapshot.digest:
        message = f"dataset unchanged since v{latest.version}, nothing to do"
        return RetrainPlan(changed=False, version=latest.version, training_id=latest.training_id, message=message)
    version = 1 if latest is None else latest.version + 1
    since = "no version yet" if latest is None else f"dataset changed since v{latest.version}"
    return RetrainPlan(changed=True, version=version, training_id=version_training_id(model_name, version),
                       message=f"{since}: training v{version} on {len(snapshot.image_keys)} images")


@task(name="discard-unpublished", retries=3, retry_delay_seconds=[2, 5, 15])
def discard_unpublished(training_id: str) -> int:
    """Remove a finished model of the version about to be trained that was never published (an
    earlier attempt trained it, then failed to publish it, maybe on other images): the version is
    trained again from the current dataset. Checkpoints of an unfinished attempt stay (a run resumes
    from them only when made from the same inputs). Returns the objects removed."""
    store = worker_store()
    if read_manifest(store, training_id) is None:
        return 0
    removed = store.delete_prefix(training_prefix(training_id))
    run_logger().info("removed the unpublished model %s of an earlier attempt (%d objects)", training_id, removed)
    return removed


def copy_object(store: ObjectStore, source: StoredFile, dest_key: str, scratch: Path) -> StoredFile:
    """Copy one stored file to ``dest_key`` through a local temp file (model files can be large)."""
    local = store.get_file(source.key, scratch / dest_key.rsplit("/", 1)[-1])
    store.put_file(dest_key, local)
    local.unlink()
    return source.model_copy(update={"key": dest_key})


def copy_manifest_files(store: ObjectStore, manifest: Manifest, dest_prefix: str) -> Manifest:
    """Copy every file the manifest names below ``dest_prefix``; the copy's manifest names the copies."""
    source_prefix = training_prefix(manifest.training_id)
    with tempfile.TemporaryDirectory(prefix="dreamflow-publish-") as scratch:
        def copied(item: StoredFile) -> StoredFile:
            return copy_object(store, item, dest_prefix + item.key.removeprefix(source_prefix), Path(scratch))

        files = {name: copied(item) for name, item in manifest.files.items()}
        samples = [copied(item) for item in manifest.samples]
    return manifest.model_copy(update={"files": files, "samples": samples})


@task(name="publish-version", retries=3, retry_delay_seconds=[2, 5, 15])
def publish_version(model_name: str, plan: RetrainPlan, snapshot: DatasetSnapshot) -> ModelVersion:
    """Copy the training's files and manifest to ``models/<name>/v<N>/``, then write ``latest.json`` last."""
    store = worker_store()
    manifest = read_manifest(store, plan.training_id)
    if manifest is None:
        raise TrainingIncomplete(f"training {plan.training_id} has no manifest; v{plan.version} not published")
    prefix = version_prefix(model_name, plan.version)
    published = copy_manifest_files(store, manifest, prefix)
    store.put_bytes(f"{prefix}manifest.json", json.dumps(published.model_dump(mode="json"), indent=2).encode(),
                    "application/json")
    latest = ModelVersion(model_name=model_name, version=plan.version, dataset_hash=snapshot.digest,
                          training_id=plan.training_id, images=len(snapshot.image_keys), created_at=time.time())
    store.put_bytes(latest_key(model_name), latest.model_dump_json(indent=2).encode(), "application/json")
    run_logger().info("published %s v%d (%d files) from training %s", model_name, plan.version,
                      len(published.files) + len(published.samples), plan.training_id)
    return latest


def stored_versions(store: ObjectStore, model_name: str) -> list[int]:
    """The version numbers that have a folder under ``models/<name>/``, ascending."""
    prefix = model_prefix(model_name)
    found = {int(m.group(1)) for k in store.list(prefix) if (m := _VERSION_FOLDER.match(k.removeprefix(prefix)))}
    return sorted(found)


@task(name="prune-versions", retries=3, retry_delay_seconds=[2, 5, 15])
def prune_versions(model_name: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` versions (their copies and their training's files); returns the deleted."""
    store = worker_store()
    old = stored_versions(store, model_name)[:-keep]
    for version in old:
        prefix = version_prefix(model_name, version)
        try:
            training_id = Manifest.model_validate_json(store.get_bytes(f"{prefix}manifest.json")).training_id
            store.delete_prefix(training_prefix(training_id))
        except ObjectNotFound:
            pass  # a version folder without a manifest: only its own copies remain to delete
        store.delete_prefix(prefix)
    if old:
        run_logger().info("%s: deleted versions %s, keeping the newest %d", model_name, old, keep)
    return old
