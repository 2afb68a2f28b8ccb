"""Scheduled retraining through the real stack: the `retrain` deployment started through the
Prefect API (as its schedule would), on a dataset folder in the S3 store.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from uuid import UUID

import httpx
import pytest

from flows.records import Manifest, read_manifest
from prefectruns import start_deployment, wait_for_final, wait_for_log
from stackserver import RunningStack
from tasks.datasets import ModelVersion
from tasks.sample_photos import write_sample_photos

DEPLOYMENT = "dreamflow-retrain/retrain"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_sample_photos(tmp_path_factory.mktemp("retrain-photos"), count=3)


def retrain(stack: RunningStack, name: str, keep_versions: int = 3) -> tuple[str, str, float, UUID]:
    """Run the deployment once to a final state; returns its state type, state message, seconds and id."""
    params = {"model_name": name, "instance_prompt": "photo of sks thing", "max_train_steps": 5,
              "sample_count": 1, "keep_versions": keep_versions}
    started = time.monotonic()
    run_id = start_deployment(stack.settings.prefect_api, DEPLOYMENT, {"params": params})
    run = wait_for_final(stack.settings.prefect_api, run_id)
    seconds = time.monotonic() - started
    assert run.state is not None
    return run.state.type.value, run.state.message or "", seconds, run_id


def latest(stack: RunningStack, name: str) -> ModelVersion:
    return ModelVersion.model_validate_json(stack.store.get_bytes(f"models/{name}/latest.json"))


def assert_version_published(stack: RunningStack, name: str, version: int) -> None:
    """models/<name>/v<N>/ holds the manifest and a copy of every file it names, byte for byte."""
    prefix = f"models/{name}/v{version}/"
    published = Manifest.model_validate_json(stack.store.get_bytes(f"{prefix}manifest.json"))
    training = read_manifest(stack.store, f"{name}-v{version}")
    assert training is not None and published.training_id == training.training_id
    assert set(published.files) == set(training.files) and published.files
    for file_name, copy in published.files.items():
        assert copy.key.startswith(prefix)
        assert copy.sha256 == training.files[file_name].sha256
        assert stack.store.get_bytes(copy.key) == stack.store.get_bytes(training.files[file_name].key)


def subflow_runs(stack: RunningStack, run_id: UUID) -> list[dict]:
    """The flow runs started inside a retrain run (its training, when it trains)."""
    response = httpx.post(f"{stack.settings.prefect_api}/flow_runs/filter", timeout=10,
                          json={"flow_runs": {"parent_flow_run_id": {"any_": [str(run_id)]}}})
    response.raise_for_status()
    return response.json()


def test_retrains_only_when_the_dataset_changed_and_keeps_the_last_versions(
    stack: RunningStack, photos: list[Path]
) -> None:
    name = f"retrain-{uuid.uuid4().hex[:6]}"
    for photo in photos[:2]:
        stack.store.put_file(f"datasets/{name}/{photo.name}", photo)

    state, message, first_s, first_run = retrain(stack, name)
    assert state == "COMPLETED", message
    assert len(subflow_runs(stack, first_run)) == 1  # v1 was trained, in a subflow run
    assert message == f"published {name} v1 (2 images)"
    first = latest(stack, name)
    assert (first.version, first.images, first.training_id) == (1, 2, f"{name}-v1")
    assert_version_published(stack, name, 1)

    state, message, unchanged_s, run_id = retrain(stack, name)
    assert state == "COMPLETED"
    assert message == "dataset unchanged since v1, nothing to do"
    wait_for_log(stack.settings.prefect_api, run_id, "dataset unchanged since v1, nothing to do")
    assert latest(stack, name) == first
    assert not stack.store.list(f"trainings/{name}-v2/")
    assert subflow_runs(stack, run_id) == []  # no training was even started

    stack.store.put_file(f"datasets/{name}/{photos[2].name}", photos[2])
    state, message, second_s, _ = retrain(stack, name, keep_versions=1)
    assert state == "COMPLETED", message
    assert message == f"published {name} v2 (3 images), deleted v1"
    second = latest(stack, name)
    assert (second.version, second.images, second.training_id) == (2, 3, f"{name}-v2")
    assert second.dataset_hash != first.dataset_hash
    assert_version_published(stack, name, 2)
    remaining = {key.split("/")[2] for key in stack.store.list(f"models/{name}/")}
    assert remaining == {"v2", "latest.json"}
    assert not stack.store.list(f"trainings/{name}-v1/")
    print(f"\nretrain: v1 {first_s:.1f} s, unchanged {unchanged_s:.1f} s, v2 {second_s:.1f} s")


def test_a_version_trained_but_never_published_is_trained_again(stack: RunningStack, photos: list[Path]) -> None:
    """An earlier attempt finished v1's training, then failed before publishing it (perhaps on photos
    since replaced): the next run trains v1 afresh from the current dataset instead of being refused
    the id or publishing the stale model."""
    from flows.records import write_manifest

    name = f"retrain-{uuid.uuid4().hex[:6]}"
    stack.store.put_file(f"datasets/{name}/{photos[0].name}", photos[0])
    write_manifest(stack.store, Manifest(training_id=f"{name}-v1", owner="scheduler", method="lora", base_model_id="tiny",
                                         family="sd15", instance_prompt="photo of the old subject"))
    stack.store.put_bytes(f"trainings/{name}-v1/exports/stale.safetensors", b"old weights")

    state, message, _, _ = retrain(stack, name)
    assert state == "COMPLETED", message
    assert message == f"published {name} v1 (1 images)"
    published = Manifest.model_validate_json(stack.store.get_bytes(f"models/{name}/v1/manifest.json"))
    assert published.instance_prompt == "photo of sks thing"
    assert not stack.store.exists(f"trainings/{name}-v1/exports/stale.safetensors")
