"""Scheduled retraining: retrain a named model from a dataset folder when its images changed."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import Completed, State
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows.imagebytes import STORE_SCHEME
from flows.params import Method, TrainingParams, TrainingType
from flows.training import run_training
from tasks.context import run_logger
from tasks.datasets import (
    DatasetSnapshot,
    RetrainPlan,
    compare_with_latest,
    discard_unpublished,
    hash_dataset,
    prune_versions,
    publish_version,
)

DATASETS_ROOT = "datasets/"


class RetrainParams(BaseModel):
    """What the retraining deployment needs: the model, its dataset folder and how to train it."""

    model_config = ConfigDict(frozen=True)

    model_name: str = Field(
        description="Name of the model; versions are published under models/{name}/v{N}/.",
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
    )
    dataset_prefix: str = Field(
        "", description="Store folder holding the training images; empty means datasets/{model_name}/."
    )
    instance_prompt: str = Field(description="Prompt naming the subject, e.g. 'photo of sks person'.", min_length=1)
    class_prompt: str | None = Field(None, description="Prompt naming the class, e.g. 'photo of person'.")
    base_model_id: str = Field("tiny", description="Key of the base-model registry.")
    method: Method = Field("lora", description="lora, lycoris (= loha), loha, lokr or dreambooth (full fine-tune).")
    training_type: TrainingType | None = Field(None, description="men/female/women/couple; empty for objects.")
    max_train_steps: int = Field(200, ge=1, description="Training steps of each new version.")
    sample_count: int = Field(2, ge=0, le=8, description="Sample images generated from each new version.")
    seed: int = Field(0, description="Random seed of training and samples.")
    keep_versions: int = Field(3, ge=1, le=100, description="Versions kept; older ones are deleted after a publish.")
    owner: str = Field("scheduler", description="Owner of the trainings: an API key hash, or a name.")

    @model_validator(mode="before")
    @classmethod
    def default_dataset_prefix(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("dataset_prefix") and data.get("model_name"):
            return {**data, "dataset_prefix": f"{DATASETS_ROOT}{data['model_name']}/"}
        return data

    @field_validator("dataset_prefix")
    @classmethod
    def inside_datasets(cls, value: str) -> str:
        if not value.startswith(DATASETS_ROOT) or not value.endswith("/") or ".." in value.split("/"):
            raise ValueError(f"dataset_prefix must be a folder under {DATASETS_ROOT} ending with '/', got {value!r}")
        return value


def training_params(params: RetrainParams, plan: RetrainPlan, snapshot: DatasetSnapshot) -> TrainingParams:
    """The training of one new version: the dataset's images as ``store:`` references."""
    return TrainingParams(
        training_id=plan.training_id, owner=params.owner, method=params.method,
        instance_prompt=params.instance_prompt, class_prompt=params.class_prompt,
        base_model_id=params.base_model_id, images=[f"{STORE_SCHEME}{key}" for key in snapshot.image_keys],
        seed=params.seed, training_type=params.training_type, max_train_steps=params.max_train_steps,
        sample_count=params.sample_count,
    )


@flow(name="dreamflow-retrain", log_prints=False)
def retrain_model(params: RetrainParams) -> State:
    """Retrain a named model from its dataset folder if the images changed since its last version.

    An unchanged dataset ends the run at once with a message saying so; a changed one trains
    ``{name}-v{N}`` (the training flow, as a subflow), publishes ``models/{name}/v{N}/``, writes
    ``models/{name}/latest.json`` last and deletes all but the newest ``keep_versions`` versions.
    """
    snapshot = hash_dataset(params.dataset_prefix)
    plan = compare_with_latest(params.model_name, snapshot)
    run_logger().info("%s: %s", params.model_name, plan.message)
    if not plan.changed:
        return Completed(message=plan.message, data=plan.message)
    discard_unpublished(plan.training_id)
    run_training(training_params(params, plan, snapshot))
    latest = publish_version(params.model_name, plan, snapshot)
    deleted = prune_versions(params.model_name, params.keep_versions)
    pruned = f", deleted {', '.join(f'v{v}' for v in deleted)}" if deleted else ""
    message = f"published {params.model_name} v{latest.version} ({latest.images} images){pruned}"
    return Completed(message=message, data=message)
