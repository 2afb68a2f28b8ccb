"""The old LoRA-only entry point, kept for callers not yet moved to `tasks.train_engine.train`.

`train_lora(LoraTrainConfig, ...)` is `train(TrainConfig(method="lora", family="sd15", ...))`
with the old three-argument progress callback `on_progress(step, total, loss)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.engine_config import (
    LORA_WEIGHT_NAME,
    ProgressEvent,
    StopCheck,
    TrainConfig,
    TrainingCancelled,
    TrainingDiverged,
    TrainingError,
    TrainResult,
)

__all__ = [
    "LORA_WEIGHT_NAME",
    "LoraTrainConfig",
    "TrainResult",
    "TrainingCancelled",
    "TrainingDiverged",
    "TrainingError",
    "train_lora",
]

ProgressCallback = Callable[[int, int, float], None]


class LoraTrainConfig(BaseModel):
    """Options of one SD 1.x LoRA training run (a subset of `TrainConfig`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pretrained_path: str = Field(description="Base model: a local diffusers folder or a Hugging Face hub id.")
    resolution: int = Field(gt=0, description="Square training resolution in pixels (512 for SD 1.x).")
    rank: int = Field(default=4, gt=0, description="LoRA rank (dimension of the low-rank update).")
    alpha: float | None = Field(
        default=None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. Defaults to rank."
    )
    learning_rate: float = Field(default=1e-4, gt=0, description="AdamW learning rate of the LoRA weights.")
    max_train_steps: int = Field(gt=0, description="Number of optimisation steps.")
    train_batch_size: int = Field(default=1, gt=0, description="Images per step.")
    seed: int = Field(description="Seed of LoRA initialisation, batch order, noise and timesteps.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="no", description="Precision of the frozen weights and the forward pass."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Trade compute for memory by recomputing UNet activations."
    )
    target_modules: tuple[str, ...] = Field(
        default=("to_q", "to_k", "to_v", "to_out.0"), description="UNet module names that get LoRA adapters."
    )
    lr_warmup_steps: int = Field(default=0, ge=0, description="Linear learning-rate warm-up steps.")
    report_every: int = Field(default=5, gt=0, description="Steps between loss reports (each syncs the device).")
    offset_noise: float = Field(default=0.0, ge=0, description="Offset-noise strength (0 disables it).")
    snr_gamma: float | None = Field(default=None, gt=0, description="Min-SNR weighting gamma; None disables it.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient-norm clipping threshold.")

    @model_validator(mode="after")
    def _default_alpha_to_rank(self) -> LoraTrainConfig:
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        return self

    def to_train_config(self) -> TrainConfig:
        return TrainConfig(method="lora", family="sd15", **self.model_dump())


def train_lora(
    config: LoraTrainConfig,
    images: Sequence[Path],
    captions: Sequence[str],
    output_dir: Path,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> TrainResult:
    """Train a LoRA on `images` (one caption each) and save it to `output_dir`."""
    from tasks.train_engine import train

    def forward(event: ProgressEvent) -> None:
        if on_progress is not None:
            on_progress(event.step, event.total, event.loss)

    return train(config.to_train_config(), images, captions, output_dir, forward, should_stop)
