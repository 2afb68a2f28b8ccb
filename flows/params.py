"""Parameter and result models shared by the facade and the flows (pydantic only, no heavy imports).

The Prefect UI renders a form from :class:`TrainingParams`, so every field carries a description.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TrainingType = Literal["men", "female", "women", "couple"]
TRAINING_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"  # it names storage folders and work folders
Method = Literal["lora", "lycoris", "loha", "lokr", "dreambooth"]


class TrainingStatus(StrEnum):
    """The status values of SPEC §2.2, in pipeline order, then the two terminal ones."""

    DEPLOYING_GPU = "deploying_gpu"
    TRAINING_STARTED = "training_started"
    TRAINING_SUCCESS = "training_success"
    COMPRESSING = "trained_model_compressing"
    UPLOADING = "trained_model_uploading"
    UPLOADED = "trained_model_uploaded"
    DEPLOYING_MODEL = "deploying_model"
    MODEL_READY = "model_ready"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TrainingParams(BaseModel):
    """Everything one training run needs; the flow's single parameter."""

    model_config = ConfigDict(frozen=True)

    training_id: str = Field(
        description="Id handed to the client (also the model id): 4-32 letters, digits, '-' or '_'. A new "
                    "training needs an id no other training uses.",
        min_length=4, max_length=32, pattern=TRAINING_ID_PATTERN,
    )
    owner: str = Field(
        "ui",
        description="Owner: the hash of the API key whose client may see the training (the first 24 hex "
                    "digits of the key's SHA-256), or a name for runs only the UI shows.",
    )
    method: Method = Field("lora", description="lora, lycoris (= loha), loha, lokr or dreambooth (full fine-tune).")
    instance_prompt: str = Field(description="Prompt naming the subject, e.g. 'photo of sks person'.", min_length=1)
    class_prompt: str | None = Field(None, description="Prompt naming the class, e.g. 'photo of person'.")
    negative_prompt: str | None = Field(None, description="Negative prompt for the sample images.")
    base_model_id: str = Field("tiny", description="Key of the base-model registry.")
    images: list[str] = Field(
        description="Image URLs, dreamflow links (store: keys, or links from base64_crop) or data: URIs. A run's "
                    "parameters may hold 512 KB in all: upload larger photos first (base64_crop, or the store).",
        min_length=1,
    )
    seed: int = Field(0, description="Random seed of training and samples.")
    training_type: TrainingType | None = Field(None, description="men/female/women/couple; empty for objects.")
    max_train_steps: int = Field(200, ge=1, description="Training steps.")
    rank: int = Field(4, ge=1, le=256, description="LoRA rank.")
    alpha: float = Field(4.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    learning_rate: float | None = Field(
        None, gt=0, le=1.0,
        description="Learning rate of the UNet (or its adapter); empty: the base model's default for the method "
                    "(e.g. 1e-4 for a LoRA, 2e-6 for DreamBooth on SD 1.5).",
    )
    text_encoder_learning_rate: float = Field(1e-6, gt=0, le=1.0, description="Learning rate of the text encoder.")
    text_encoder_steps: int = Field(0, ge=0, description="Steps the text encoder trains (DreamBooth); 0 keeps it frozen.")
    half_precision: bool = Field(False, description="Export DreamBooth's checkpoint and diffusers folder in fp16 (half the size).")
    sample_count: int = Field(2, ge=0, le=8, description="Sample images generated from the trained model.")
    sample_steps: int = Field(20, ge=1, le=150, description="Denoising steps of each sample image.")
    webhook: str | None = Field(None, description="URL that receives status changes.")


class StageRecord(BaseModel):
    """What the pipeline publishes about itself in ``trainings/<id>/status.json``."""

    status: TrainingStatus = TrainingStatus.DEPLOYING_GPU
    stage: str = "queued"
    step: int = 0
    total_steps: int = 0
    steps_per_s: float | None = None
    loss: float | None = None
    error: str | None = None
    webhook: str | None = None
    log: list[str] = Field(default_factory=list)
    updated_at: float = 0.0


def default_train_steps(image_count: int, limit: int) -> int:
    """The step count used when a request names none: about 100 per image, within bounds."""
    return max(100, min(limit, 100 * image_count))


def estimate_minutes(total_steps: int, seconds_per_step: float, overhead_s: float) -> int:
    """Whole minutes, rounded up, that a job of this size is expected to take."""
    return max(1, math.ceil((total_steps * seconds_per_step + overhead_s) / 60))
