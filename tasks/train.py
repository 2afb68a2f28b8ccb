"""Stage 4: train. Adapts the engine's progress callback to stage reports and the run logger."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from prefect import task
from prefect.concurrency.sync import concurrency
from pydantic import BaseModel

from flows.params import TrainingParams, TrainingStatus
from flows.settings import GPU_CONCURRENCY_LIMIT as GPU_LIMIT
from tasks.context import base_model, report_stage, workdir
from tasks.models import resolve_pretrained

REPORT_INTERVAL_S = 1.0



class UnsupportedMethod(RuntimeError):
    """A training method this worker cannot run."""


class TrainOutput(BaseModel):
    """What training produced: a reference to the weights and the figures of the run."""

    lora_file: str
    pretrained: str
    family: str
    resolution: int
    rank: int
    alpha: float
    steps: int
    final_loss: float
    losses: list[tuple[int, float]]
    seconds: float


def progress_reporter(training_id: str, started: float) -> Callable[[int, int, float], None]:
    """An ``on_progress(step, total, loss)`` that publishes at most once per interval."""
    last = [0.0]

    def on_progress(step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - last[0] < REPORT_INTERVAL_S and step < total:
            return
        last[0] = now
        rate = step / max(now - started, 1e-6)
        report_stage(
            training_id, TrainingStatus.TRAINING_STARTED, "training",
            f"Step:{step}/{total} loss {loss:.4f}",
            step=step, total_steps=total, loss=loss, steps_per_s=rate,
        )

    return on_progress


@task(name="train-lora")
def train_model(params: TrainingParams, crop_paths: list[str], captions: list[str]) -> TrainOutput:
    """Train a LoRA on the crops; returns the path of the diffusers-format weights."""
    from tasks.lora_engine import LoraTrainConfig, train_lora  # torch, diffusers, peft

    if params.method != "lora":
        raise UnsupportedMethod(f"{params.method} training is not available on this worker yet")
    entry = base_model(params.base_model_id)
    pretrained = resolve_pretrained(entry)
    report_stage(
        params.training_id, TrainingStatus.TRAINING_STARTED, "training",
        f"Training Started on {len(crop_paths)} images", step=0, total_steps=params.max_train_steps,
    )
    config = LoraTrainConfig(
        pretrained_path=pretrained, resolution=entry.resolution, rank=params.rank, alpha=params.alpha,
        learning_rate=params.learning_rate, max_train_steps=params.max_train_steps, seed=params.seed,
    )
    with concurrency(GPU_LIMIT, occupy=1):  # one GPU slot per training, across all workers
        started = time.monotonic()
        result = train_lora(
            config, [Path(p) for p in crop_paths], captions, workdir(params.training_id, "lora"),
            on_progress=progress_reporter(params.training_id, started),
        )
    report_stage(
        params.training_id, TrainingStatus.TRAINING_SUCCESS, "trained",
        f"Training finished: {result.steps} steps in {result.seconds:.1f} s, loss {result.final_loss:.4f}",
        step=result.steps, total_steps=result.steps, loss=result.final_loss,
    )
    return TrainOutput(
        lora_file=str(result.lora_file), pretrained=pretrained, family=entry.family, resolution=entry.resolution,
        rank=result.rank, alpha=result.alpha, steps=result.steps, final_loss=result.final_loss,
        losses=list(result.losses), seconds=result.seconds,
    )
