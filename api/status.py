"""Derive the public training status from the flow run's state and the pipeline's records."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from collections.abc import Callable

from prefect.client.schemas.objects import StateType

from api.gateway import ACTIVE, TrainingRun
from api.schemas import ProgressPublic, StatusPublic
from flows.params import StageRecord, TrainingStatus
from flows.records import Manifest, read_manifest, read_stage
from flows.registry import BaseModelEntry
from flows.settings import Settings
from flows.store import ObjectStore

# Seconds the stages after the training loop take (convert, upload, samples, manifest) when
# nothing better is known; the first measured jobs on a deployment are the better estimate.
POST_TRAINING_S = 20.0
PRE_TRAINING_S = 15.0

WAITING = {None, StateType.SCHEDULED, StateType.PENDING, StateType.PAUSED}
ENDED_BADLY = {StateType.FAILED, StateType.CRASHED}
# A crashed training is put back in the queue by the crash-rerun automation within seconds; until
# then (and for this long at most) it is shown as waiting, not failed.
CRASH_RERUN_GRACE_S = 120.0
CRASH_LINE = "the worker was lost; the training is queued again and resumes from its last checkpoint"


def awaiting_rerun(run: TrainingRun) -> bool:
    """A crash recent enough that the rerun automation has not rescheduled it yet."""
    if run.state != StateType.CRASHED or run.state_since is None:
        return False
    return (datetime.now(timezone.utc) - run.state_since).total_seconds() < CRASH_RERUN_GRACE_S
CANCELLED = {StateType.CANCELLED, StateType.CANCELLING}


@dataclass(frozen=True)
class QueueWait:
    """The trainings ahead of one, and the seconds until a GPU slot is expected to be free for it."""

    ahead: int = 0
    seconds: float = 0.0


NO_WAIT = QueueWait()


def job_seconds(total_steps: int, seconds_per_step: float) -> float:
    """Expected wall time of a whole job before it has measured its own step rate."""
    return PRE_TRAINING_S + total_steps * seconds_per_step + POST_TRAINING_S


def eta_text(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    return f"{minutes} minute" if minutes == 1 else f"{minutes} minutes"


FINAL_LINES = {TrainingStatus.MODEL_READY: "model ready", TrainingStatus.CANCELLED: "training cancelled"}


def public_status(run: TrainingRun, stage: StageRecord | None, manifest: Manifest | None) -> TrainingStatus:
    """One of the ten status values, from what Prefect and the store say."""
    if run.state in CANCELLED:
        return TrainingStatus.CANCELLED
    if manifest is not None:  # complete, whatever befell the run after it wrote the manifest
        return TrainingStatus.MODEL_READY
    if awaiting_rerun(run):
        return TrainingStatus.DEPLOYING_GPU
    if run.state in ENDED_BADLY:
        return TrainingStatus.FAILED
    if run.state == StateType.COMPLETED:
        return TrainingStatus.FAILED
    if run.state in WAITING or stage is None:
        return TrainingStatus.DEPLOYING_GPU
    return stage.status if stage.status != TrainingStatus.MODEL_READY else TrainingStatus.DEPLOYING_MODEL


def eta_seconds(status: TrainingStatus, stage: StageRecord | None, total_steps: int, seconds_per_step: float) -> float | None:
    """Seconds left: measured step rate while training, the registry's estimate before."""
    if status in (TrainingStatus.MODEL_READY, TrainingStatus.FAILED, TrainingStatus.CANCELLED):
        return None
    if status == TrainingStatus.DEPLOYING_GPU:
        return job_seconds(total_steps, seconds_per_step)
    if status == TrainingStatus.TRAINING_STARTED:  # the registry's step time until the loop has measured its own
        steps_left = max(0, total_steps - (stage.step if stage else 0))
        rate = stage.steps_per_s if stage else None
        return steps_left * (1 / rate if rate else seconds_per_step) + POST_TRAINING_S
    return POST_TRAINING_S


def error_text(status: TrainingStatus, run: TrainingRun, stage: StageRecord | None) -> str | None:
    if status == TrainingStatus.FAILED:
        if stage is not None and stage.error:
            return stage.error
        if run.state == StateType.COMPLETED:
            return "the run ended without publishing its model; retry the training"
        return run.state_message or "the training failed"
    if status == TrainingStatus.CANCELLED:
        return "cancelled by the owner"
    return None


def model_links(manifest: Manifest | None, link: Callable[[str], str]) -> tuple[dict[str, object], str | None]:
    """Download links of a finished model and its test image."""
    if manifest is None:
        return {}, None
    links: dict[str, object] = {name: link(f.key) for name, f in manifest.files.items()}
    named = {s.key.rsplit("/", 1)[-1]: s for s in manifest.samples}
    grid, curve = named.pop("grid.png", None), named.pop("loss_curve.png", None)
    samples = [named[name] for name in sorted(named)]
    links["samples"] = [link(s.key) for s in samples]
    if curve is not None:
        links["loss_curve"] = link(curve.key)
    test_image = grid or (samples[0] if samples else None)
    return links, link(test_image.key) if test_image else None


def compose_status(
    run: TrainingRun,
    stage: StageRecord | None,
    manifest: Manifest | None,
    link: Callable[[str], str],
    seconds_per_step: float,
    wait: QueueWait = NO_WAIT,
) -> StatusPublic:
    """The full status answer of SPEC §2.3; ``wait``: the trainings ahead of a queued one."""
    status = public_status(run, stage, manifest)
    total = (stage.total_steps if stage and stage.total_steps else None) or int(run.parameters.get("max_train_steps", 0))
    step = total if status == TrainingStatus.MODEL_READY else (stage.step if stage else 0)
    eta = eta_seconds(status, stage, total, seconds_per_step)
    last_line = stage.log[-1] if stage and stage.log else "Deploying GPU, waiting for a worker"
    if status == TrainingStatus.DEPLOYING_GPU and eta is not None and wait.ahead:
        eta += wait.seconds
        last_line += f"; {ahead_text(wait.ahead)}"
    error = error_text(status, run, stage)
    if status == TrainingStatus.FAILED and not last_line.startswith("failed"):  # its own failure line went unstored
        last_line = f"failed: {error}"
    if status == TrainingStatus.DEPLOYING_GPU and awaiting_rerun(run):
        last_line = CRASH_LINE
    data = f"{last_line}, ETA : {eta_text(eta)}" if eta is not None else last_line
    links, test_image = model_links(manifest, link)
    return StatusPublic(
        messege=status.value,
        training_status=status.value,
        data=FINAL_LINES.get(status, data),
        model_id=run.training_id,
        progress=ProgressPublic(step=step, total_steps=total, percent=round(100.0 * step / total, 1) if total else 0.0),
        eta_seconds=math.ceil(eta) if eta is not None else None,
        error=error,
        links=links,
        test_image=test_image,
    )


def ahead_text(count: int) -> str:
    return f"{count} training{'s' if count != 1 else ''} ahead in the queue"


def status_body(store: ObjectStore, settings: Settings, registry: dict[str, BaseModelEntry],
                queue: Callable[[str, datetime | None], QueueWait], training_id: str, run: TrainingRun) -> bytes:
    """The serialized status answer of one training: store reads and link signing (blocking; call it
    in a worker thread). ``queue`` tells the wait of a training created at a time."""
    stage, manifest = read_stage(store, training_id), read_manifest(store, training_id)
    entry = registry.get(str(run.parameters.get("base_model_id")))
    wait = queue(training_id, run.created) if run.state in ACTIVE else NO_WAIT
    status = compose_status(run, stage, manifest, lambda key: store.link(key, settings.link_expiry_s),
                            entry.seconds_per_step if entry else 1.0, wait)
    return status.model_dump_json(by_alias=True).encode()
