"""Stage 4: train. Adapts the engine's progress callback to stage reports and the run logger."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from prefect import task
from pydantic import BaseModel

from flows.params import TrainingParams, TrainingStatus
from flows.records import training_prefix
from flows.registry import BaseModelEntry
from flows.settings import GPU_CONCURRENCY_LIMIT
from tasks.artifacts import ProgressArtifact
from tasks.context import base_model, report_stage, worker_settings, worker_store, workdir
from tasks.gpuslot import gpu_slot
from tasks.models import resolve_pretrained
from tasks.registration import timed_stage

if TYPE_CHECKING:
    from tasks.engine_config import ProgressEvent, TrainConfig

REPORT_INTERVAL_S = 1.0
GPU_LEASE_S = 60.0  # the shortest lease the Prefect server accepts
LYCORIS_ALGORITHM = "loha"  # what lora_type=lycoris trains: LoHa, the LyCORIS algorithm A1111/ComfyUI load most widely


class TrainOutput(BaseModel):
    """What training produced: a reference to the weights and the figures of the run."""

    method: str
    weights: str  # the adapter file (lora/loha/lokr) or the diffusers pipeline folder (dreambooth)
    pretrained: str
    family: str
    resolution: int
    rank: int
    alpha: float
    steps: int
    resumed_from: int | None
    final_loss: float
    losses: list[tuple[int, float]]
    seconds: float
    trained_between: tuple[float, float]  # wall-clock times the GPU slot was held


def progress_reporter(training_id: str) -> Callable[[ProgressEvent], None]:
    """An ``on_progress`` that publishes step, loss and the measured rate at most once per interval,
    to the status record and to the progress artifact in the Prefect UI."""
    last = [0.0]
    artifact = ProgressArtifact(training_id)

    def on_progress(event: ProgressEvent) -> None:
        now = time.monotonic()
        if now - last[0] < REPORT_INTERVAL_S and event.step < event.total:
            return
        last[0] = now
        artifact.update(event.step, event.total)
        report_stage(
            training_id, TrainingStatus.TRAINING_STARTED, "training",
            f"Step:{event.step}/{event.total} loss {event.loss:.4f}",
            step=event.step, total_steps=event.total, loss=event.loss, steps_per_s=event.steps_per_second,
        )

    return on_progress


def engine_method(params: TrainingParams) -> str:
    return LYCORIS_ALGORITHM if params.method == "lycoris" else params.method


def train_config(params: TrainingParams, entry: BaseModelEntry, pretrained: str, cuda: bool) -> TrainConfig:
    """The engine's options for a training request on a base model."""
    from tasks.engine_config import TrainConfig
    from tasks.prior import default_class_prompt

    dreambooth = params.method == "dreambooth"
    default_rate = entry.dreambooth_learning_rate if dreambooth else entry.lora_learning_rate
    return TrainConfig(
        pretrained_path=pretrained, family=entry.family, method=engine_method(params), resolution=entry.resolution,
        rank=params.rank, alpha=params.alpha, learning_rate=params.learning_rate or default_rate,
        text_encoder_learning_rate=params.text_encoder_learning_rate,
        text_encoder_steps=params.text_encoder_steps if dreambooth else 0,
        max_train_steps=params.max_train_steps, seed=params.seed,
        checkpoint_every=worker_settings().checkpoint_every, compile_unet=worker_settings().compile_unet,
        cuda_graphs=worker_settings().cuda_graphs,
        class_prompt=(params.class_prompt or default_class_prompt(params.training_type)) if dreambooth else None,
        mixed_precision="bf16" if cuda else "no", gradient_checkpointing=needs_checkpointing(cuda, dreambooth, entry),
    )


def needs_checkpointing(cuda: bool, dreambooth: bool, entry: BaseModelEntry) -> bool:
    """Recompute activations only where memory needs it: full fine-tunes and SDXL on a GPU.

    For an SD 1.x LoRA at batch 1 it halves the speed and saves almost nothing (measured on an
    H200: 281 vs 130 ms/step, 3.22 vs 3.29 GiB; bench/results/gpu_train.json).
    """
    return cuda and (dreambooth or entry.family == "sdxl")


def class_images(params: TrainingParams, config: TrainConfig, entry: BaseModelEntry) -> list[Path] | None:
    """Prior-preservation images for DreamBooth: generated once per base model and class, then cached."""
    if config.class_prompt is None or entry.class_images == 0:
        return None
    from tasks.prior import ensure_class_images

    report_stage(params.training_id, TrainingStatus.TRAINING_STARTED, "class-images",
                 f"preparing {entry.class_images} class images for '{config.class_prompt}'")
    return ensure_class_images(worker_store(), config.pretrained_path, entry.family, config.class_prompt,
                               entry.resolution, entry.class_images, params.seed,
                               work_dir=workdir(params.training_id, "class"))


@task(name="train-model")
@timed_stage
def train_model(params: TrainingParams, crop_paths: list[str], captions: list[str]) -> TrainOutput:
    """Train the requested model on the crops, resuming from the training's last checkpoint if any."""
    import torch

    from tasks.checkpoints import CheckpointStore
    from tasks.engine_setup import prepare_session
    from tasks.resident import hand_over_trained
    from tasks.train_engine import train

    entry = base_model(params.base_model_id)
    pretrained = resolve_pretrained(entry)
    config = train_config(params, entry, pretrained, torch.cuda.is_available())
    if config.compile_unet:  # compiled kernels survive the flow-run process: later jobs skip compiling
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(worker_settings().data_dir / "cache" / "inductor"))
    report_stage(params.training_id, TrainingStatus.DEPLOYING_GPU, "waiting-for-gpu", "waiting for a free GPU slot")
    images = [Path(p) for p in crop_paths]
    # One GPU slot per training, across all workers. The lease is renewed while training runs; a
    # process that died (and so stopped renewing) frees its slot within GPU_LEASE_S. While the slot
    # is asked for, the images are read and the trainable model built on the CPU.
    with gpu_slot(GPU_CONCURRENCY_LIMIT, GPU_LEASE_S, meanwhile=lambda: prepare_session(config, images)) as slot:
        started_at = time.time()
        report_stage(params.training_id, TrainingStatus.TRAINING_STARTED, "training",
                     f"Training Started on {len(crop_paths)} images (GPU slot after {slot.waited_s:.2f} s; "
                     f"images and model prepared meanwhile in {slot.meanwhile_s:.2f} s)",
                     step=0, total_steps=params.max_train_steps)
        result = train(
            config, images, captions, workdir(params.training_id, "model"), prepared=slot.prepared,
            on_progress=progress_reporter(params.training_id),
            checkpoints=CheckpointStore(worker_store(), f"{training_prefix(params.training_id)}checkpoints"),
            class_images=class_images(params, config, entry),
            keep_trained=lambda unet: hand_over_trained(params.training_id, unet),  # for the samples
        )
        trained_between = (started_at, time.time())
    report_stage(
        params.training_id, TrainingStatus.TRAINING_SUCCESS, "trained",
        f"Training finished: {result.steps} steps in {result.seconds:.1f} s "
        f"({', '.join(f'{name} {seconds:.2f} s' for name, seconds in result.phases.items())}), loss {result.final_loss:.4f}"
        + (f"; resumed from the checkpoint at step {result.resumed_from}" if result.resumed_from else ""),
        step=result.steps, total_steps=result.steps, loss=result.final_loss,
    )
    weights = result.pipeline_dir if result.pipeline_dir is not None else result.adapter_file
    return TrainOutput(
        method=result.method, weights=str(weights), pretrained=pretrained, family=entry.family,
        resolution=entry.resolution, rank=result.rank, alpha=result.alpha, steps=result.steps,
        resumed_from=result.resumed_from, final_loss=result.final_loss, losses=list(result.losses),
        seconds=result.seconds, trained_between=trained_between,
    )
