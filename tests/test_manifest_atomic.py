"""A model is complete exactly when its manifest exists: a failure between upload and manifest
leaves a training that is not ready and not downloadable, and a rerun of the same run completes it.

The flow runs in this test process against the stack's real Prefect server and S3 server. The
storage outage is simulated at one point only: a wrapper around the real S3 store raises
StorageUnavailable (what the real client raises when the server is gone) when the manifest is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect import tags
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.params import TrainingParams
from flows.records import read_manifest
from flows.settings import hash_key
from flows.store import ObjectStore, StorageUnavailable
from stackserver import KEYS, RunningStack
from tasks import context
from tasks.sample_photos import write_sample_photos


class ManifestOutage:
    """The real store, except that writing a manifest fails as if the S3 server were down."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self.refused = 0

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if key.endswith("/manifest.json"):
            self.refused += 1
            raise StorageUnavailable("connection refused (simulated outage)")
        self._store.put_bytes(key, data, content_type)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


@pytest.fixture
def worker_env(stack: RunningStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process acts as a worker of the stack: same settings, same Prefect server."""
    for name, value in {"STORAGE": "s3", "S3_ENDPOINT": stack.settings.s3_endpoint,
                        "S3_ACCESS_KEY": stack.settings.s3_access_key, "S3_SECRET_KEY": stack.settings.s3_secret_key,
                        "S3_BUCKET": stack.settings.s3_bucket, "DATA_DIR": str(tmp_path),
                        "ALLOW_PRIVATE_NETWORKS": "true"}.items():
        monkeypatch.setenv(f"DREAMFLOW_{name}", value)
    context.worker_settings.cache_clear()
    context.worker_store.cache_clear()
    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api}):
        yield
    context.worker_settings.cache_clear()
    context.worker_store.cache_clear()


def test_failure_before_the_manifest_leaves_no_ready_model_and_a_rerun_completes_it(
    stack: RunningStack, worker_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows import training
    from tasks import storage

    owner = hash_key(KEYS[0])
    photos = write_sample_photos(tmp_path / "photos", count=2)
    inputs = [f"trainings/ManifestT01/inputs/{p.name}" for p in photos]  # as the facade stores uploads
    for key, photo in zip(inputs, photos, strict=True):
        stack.store.put_file(key, photo)
    params = TrainingParams(training_id="ManifestT01", owner=owner, instance_prompt="photo of sks person",
                            base_model_id="tiny", images=[f"store:{key}" for key in inputs], max_train_steps=5,
                            training_type="women", sample_count=1, sample_steps=2)
    outage = ManifestOutage(context.worker_store())
    monkeypatch.setattr(storage, "worker_store", lambda: outage)
    monkeypatch.setattr(training, "publish_manifest", storage.publish_manifest.with_options(retry_delay_seconds=0))
    with tags("dreamflow", f"training:{params.training_id}", f"owner:{owner}"):
        state = training.run_training(params, return_state=True)
    assert state.is_failed() and outage.refused == 1 + len(storage.STORE_RETRY_DELAYS_S)  # the first try and every retry
    assert stack.store.list(f"trainings/{params.training_id}/export/")  # the files were uploaded ...
    assert read_manifest(stack.store, params.training_id) is None  # ... but the model is not complete
    status = _status(stack, params.training_id)
    assert status["training_status"] == "failed" and status["links"] == {}
    assert status["data"] == f"failed: {status['error']}", status

    monkeypatch.setattr(storage, "worker_store", context.worker_store)  # the storage is back
    with tags("dreamflow", f"training:{params.training_id}", f"owner:{owner}"):
        assert training.run_training(params, return_state=True).is_completed()
    assert read_manifest(stack.store, params.training_id) is not None
    assert _status(stack, params.training_id)["training_status"] == "model_ready"


def _status(stack: RunningStack, training_id: str) -> dict:
    response = httpx.post(f"{stack.base_url}/api/v3/fine_tune_status/{training_id}", json={"key": KEYS[0]}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()
