"""Stage 2: decode, face-crop and store the training crops."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import task

from flows.params import TrainingParams, TrainingStatus
from tasks.context import base_model, report_stage, run_logger, worker_settings, worker_store, workdir


class TooFewImages(RuntimeError):
    """Fewer usable images than the configured minimum remained after cropping."""


def crop_mode(params: TrainingParams) -> Literal["person", "couple", "object"]:
    """Which crop a training type gets: faces for people, the centre for objects."""
    if params.training_type is None:
        return "object"
    return "couple" if params.training_type == "couple" else "person"


@task(name="crop-faces")
def crop_faces(params: TrainingParams, raw_paths: list[str]) -> list[str]:
    """Square crops at the base model's resolution; images without a usable face are dropped."""
    from tasks import faces  # torch + MTCNN: only in the worker

    settings = worker_settings()
    entry = base_model(params.base_model_id)
    report_stage(params.training_id, TrainingStatus.DEPLOYING_GPU, "cropping", f"cropping {len(raw_paths)} images")
    results = faces.crop_images(
        [Path(p) for p in raw_paths],
        workdir(params.training_id, "crops"),
        size=entry.resolution,
        mode=crop_mode(params),
        max_pixels=settings.max_image_pixels,
    )
    dropped = [r for r in results if not r.kept]
    for result in dropped:
        run_logger().warning("image %s dropped: %s", result.source.name, result.reason)
    kept = [r.path for r in results if r.kept and r.path is not None]
    if len(kept) < settings.min_images:
        reasons = "; ".join(f"{r.source.name}: {r.reason}" for r in dropped)
        raise TooFewImages(f"only {len(kept)} usable image(s), at least {settings.min_images} needed ({reasons})")
    store = worker_store()
    for path in kept:
        store.put_file(f"trainings/{params.training_id}/crops/{path.name}", path, "image/png")
    return [str(p) for p in kept]
