"""The training engine's vocabulary: one frozen config for every method, its result, progress and errors.

Pydantic and the standard library only, so the API and flows can import it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["lora", "loha", "lokr", "dreambooth"]
Family = Literal["sd15", "sd2", "sdxl"]
ADAPTER_METHODS = ("lora", "loha", "lokr")

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LYCORIS_WEIGHT_NAME = "pytorch_lycoris_weights.safetensors"


class TrainingError(RuntimeError):
    """Base class of the errors the training loop raises on purpose."""


class TrainingCancelled(TrainingError):
    """`should_stop()` returned True; no final weights were saved (checkpoints may exist)."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report: `step` of `total` optimisation steps done."""

    step: int
    total: int
    loss: float
    steps_per_second: float


ProgressCallback = Callable[[ProgressEvent], None]
StopCheck = Callable[[], bool]


def default_step_count(image_count: int, method: Method = "lora") -> int:
    """A sensible step count from the image count: ~100 steps per image, clamped."""
    per_image, low, high = (80, 400, 1600) if method == "dreambooth" else (100, 500, 3000)
    return max(low, min(high, per_image * image_count))


class TrainConfig(BaseModel):
    """Options of one training run, for every method and model family."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pretrained_path: str = Field(description="Base model: a local diffusers folder or a Hugging Face hub id.")
    family: Family = Field(default="sd15", description="Model family: sd15 and sd2 (one text encoder) or sdxl.")
    method: Method = Field(
        default="lora", description="lora, loha or lokr (adapters on the UNet attention) or dreambooth (whole UNet)."
    )
    resolution: int = Field(gt=0, description="Square training resolution in pixels (512 SD 1.x, 1024 SDXL).")
    rank: int = Field(default=4, gt=0, description="Adapter rank (LoRA/LoHa/LoKr); ignored by dreambooth.")
    alpha: float | None = Field(
        default=None, gt=0, description="Adapter alpha; the update is scaled by alpha / rank. Defaults to rank."
    )
    target_modules: tuple[str, ...] = Field(
        default=("to_q", "to_k", "to_v", "to_out.0"), description="UNet module names that get adapters."
    )
    learning_rate: float = Field(default=1e-4, gt=0, description="Learning rate of the UNet (or its adapters).")
    text_encoder_learning_rate: float = Field(
        default=5e-6, gt=0, description="Learning rate of the text encoder while it trains (dreambooth)."
    )
    max_train_steps: int = Field(gt=0, description="Number of optimisation steps (the UNet trains in all of them).")
    text_encoder_steps: int = Field(
        default=0, ge=0, description="Train the text encoder for the first N steps (dreambooth, SD 1.x/2.x); 0 = frozen."
    )
    train_batch_size: int = Field(default=1, gt=0, description="Images per micro-batch.")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Micro-batches per optimisation step.")
    seed: int = Field(description="Seed of adapter initialisation, batch order, noise and timesteps.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="no", description="Precision of the forward pass (and of frozen weights for adapters)."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Trade compute for memory by recomputing UNet activations."
    )
    compile_unet: bool = Field(
        default=False,
        description="Compile the UNet (with CUDA graphs on a GPU): ~140 s of compiling, then steps no faster than "
        "cuda_graphs gives without compiling (SD 1.5 LoRA on an H100: 21.6 against 21.1 ms).",
    )
    cuda_graphs: bool = Field(
        default=True,
        description="On a GPU, capture the whole optimisation step in a CUDA graph after a few eager steps and "
        "replay it: no compiling, and the GPU no longer waits on Python between thousands of small kernels. "
        "Ignored on CPU, under several processes, with fp16, 8-bit AdamW, a training text encoder, gradient "
        "checkpointing or compile_unet.",
    )
    use_8bit_adam: bool = Field(
        default=True, description="Use bitsandbytes' 8-bit AdamW when it and CUDA are present; AdamW otherwise."
    )
    lr_scheduler: Literal["constant", "cosine"] = Field(
        default="constant", description="Learning-rate schedule after the warm-up."
    )
    lr_warmup_steps: int = Field(default=0, ge=0, description="Linear learning-rate warm-up steps.")
    report_every: int = Field(default=5, gt=0, description="Steps between progress reports (each syncs the device).")
    offset_noise: float = Field(default=0.0, ge=0, description="Offset-noise strength (0 disables it).")
    snr_gamma: float | None = Field(
        default=None, gt=0, description="Min-SNR weighting gamma (5.0 is usual); None disables it."
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient-norm clipping threshold.")
    prior_loss_weight: float = Field(
        default=1.0, ge=0, description="Weight of the class-image loss when class images are given."
    )
    class_prompt: str | None = Field(
        default=None, description="Caption of the class images (prior preservation); required with class images."
    )
    checkpoint_every: int = Field(
        default=0, ge=0, description="Steps between checkpoints to the object store; 0 disables them."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        if self.text_encoder_steps and self.method != "dreambooth":
            raise ValueError("text_encoder_steps > 0 needs method='dreambooth'")
        if self.text_encoder_steps and self.family == "sdxl":
            raise ValueError("text-encoder training is supported for sd15/sd2 only")
        if self.text_encoder_steps > self.max_train_steps:
            raise ValueError("text_encoder_steps cannot exceed max_train_steps")
        return self


class TrainResult(BaseModel):
    """What a finished training run produced."""

    model_config = ConfigDict(frozen=True)

    method: Method = Field(description="The training method.")
    family: Family = Field(description="The model family.")
    adapter_file: Path | None = Field(
        description="lora: diffusers-format LoRA file; loha/lokr: peft state dict + metadata; else None."
    )
    pipeline_dir: Path | None = Field(description="dreambooth: the saved diffusers pipeline folder; else None.")
    rank: int = Field(description="Adapter rank (0 for dreambooth).")
    alpha: float = Field(description="Adapter alpha (0 for dreambooth).")
    steps: int = Field(description="Optimisation steps run.")
    resumed_from: int = Field(default=0, description="Step of the checkpoint this run resumed from (0 = fresh).")
    final_loss: float = Field(description="Mean loss over the last report window.")
    losses: list[tuple[int, float]] = Field(description="(step, mean loss since the previous report).")
    seconds: float = Field(description="Wall time of the whole run, loading included.")
    phases: dict[str, float] = Field(
        default_factory=dict, description="Wall seconds of each part of the run: setup, loop, save, free."
    )

    @property
    def lora_file(self) -> Path:
        """The adapter file (the old name); raises for dreambooth."""
        if self.adapter_file is None:
            raise AttributeError("a dreambooth run has no adapter file; use pipeline_dir")
        return self.adapter_file


def check_finite(value: float, step: int, total: int) -> None:
    """Raise TrainingDiverged unless `value` is finite."""
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"loss became {value} by step {step} of {total}; lower the learning rate or use fp32/bf16"
        )
