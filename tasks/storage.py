"""Stage 6: upload artifacts with checksums, then the manifest last."""

from __future__ import annotations

import hashlib
import mimetypes
import time
from pathlib import Path

from prefect import task

from flows.params import TrainingParams, TrainingStatus
from flows.records import Manifest, StoredFile, read_manifest, training_prefix, write_manifest
from tasks.artifacts import publish_model_artifacts
from tasks.context import base_model, remove_workdir, report_stage, run_logger, worker_store
from tasks.registration import stage_seconds, timed_stage
from tasks.train import TrainOutput

HASH_CHUNK = 1 << 20
# Uploads and the manifest are idempotent, so they are retried through a storage outage (an S3
# server restarting, a network blip): up to ~2 minutes of waiting, then the training fails.
STORE_RETRY_DELAYS_S = [2, 5, 10, 20, 30, 60]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@task(name="upload-artifacts", retries=len(STORE_RETRY_DELAYS_S), retry_delay_seconds=STORE_RETRY_DELAYS_S)
@timed_stage
def upload_artifacts(training_id: str, files: dict[str, str], folder: str, announce: bool = False) -> dict[str, StoredFile]:
    """Put each local file under ``trainings/<id>/<folder>/``; returns name -> stored file record.

    With ``announce`` the upload is reported as the model-upload stage (uploading, then uploaded).
    """
    if announce:
        report_stage(training_id, TrainingStatus.UPLOADING, "uploading", f"uploading {len(files)} model files")
    store = worker_store()
    stored: dict[str, StoredFile] = {}
    for name, local in files.items():
        path = Path(local)
        key = f"{training_prefix(training_id)}{folder}/{path.name}"
        store.put_file(key, path, mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        stored[name] = StoredFile(key=key, size=path.stat().st_size, sha256=sha256_of(path))
    if announce:
        report_stage(training_id, TrainingStatus.UPLOADED, "uploaded", f"{len(stored)} model files stored")
    return stored


@task(name="publish-manifest", retries=len(STORE_RETRY_DELAYS_S), retry_delay_seconds=STORE_RETRY_DELAYS_S)
def publish_manifest(
    params: TrainingParams, trained: TrainOutput, exports: dict[str, StoredFile], samples: dict[str, StoredFile]
) -> str:
    """Write ``manifest.json`` (the model is complete from here on) and clean the work folder."""
    entry = base_model(params.base_model_id)
    manifest = Manifest(
        training_id=params.training_id, owner=params.owner, method=params.method,
        base_model_id=params.base_model_id, family=entry.family, instance_prompt=params.instance_prompt,
        parameters=params.model_dump(mode="json", exclude={"images", "webhook", "owner"}),
        files=exports, samples=[samples[k] for k in sorted(samples)],
        final_loss=trained.final_loss, steps=trained.steps, resumed_from=trained.resumed_from,
        trained_between=trained.trained_between, stage_seconds=stage_seconds(), created_at=time.time(),
    )
    store = worker_store()
    write_manifest(store, manifest)
    finish_published(manifest)
    return params.training_id


def finish_published(manifest: Manifest) -> None:
    """What follows a model's manifest: its checkpoints go (the model is complete without them), the
    UI's artifacts name its files, the status says ready, the work folder goes. Idempotent."""
    store = worker_store()
    store.delete_prefix(f"{training_prefix(manifest.training_id)}checkpoints/")
    publish_model_artifacts(manifest, store)
    report_stage(manifest.training_id, TrainingStatus.MODEL_READY, "ready", "model ready")
    remove_workdir(manifest.training_id)


@task(name="finish-published")
def finish_if_published(training_id: str) -> bool:
    """A rerun of a run that crashed after it wrote its manifest: the published model stands as it is
    (training again would replace its files under the links already handed out); only the steps after
    the manifest are done again. Returns whether the model was published."""
    manifest = read_manifest(worker_store(), training_id)
    if manifest is None:
        return False
    run_logger().info("training %s was published by an earlier attempt; its model stands, nothing is trained again",
                      training_id)
    finish_published(manifest)
    return True
