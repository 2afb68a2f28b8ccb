"""Stage 2: decode, face-crop, drop near-duplicates, store the training crops and report on them."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Literal

from prefect import task

from flows.params import TrainingParams, TrainingStatus
from tasks.artifacts import UI_LINK_EXPIRY_S, publish_artifacts
from tasks.context import base_model, report_stage, run_logger, worker_settings, worker_store, workdir
from tasks.crop_report import ReportRow, contact_sheet, markdown_report, report_rows, summary_line
from tasks.dedupe import drop_near_duplicates
from tasks.registration import timed_stage


class TooFewImages(RuntimeError):
    """Fewer usable images than the configured minimum remained after cropping."""


def crop_mode(params: TrainingParams) -> Literal["person", "couple", "object"]:
    """Which crop a training type gets: faces for people, the centre for objects."""
    if params.training_type is None:
        return "object"
    return "couple" if params.training_type == "couple" else "person"


def report_prefix(training_id: str) -> str:
    """Where the crop report of a training is stored."""
    return f"trainings/{training_id}/report/"


def store_report(training_id: str, rows: list[ReportRow], crop_dir: Path) -> str | None:
    """Store the report (JSON) and the contact sheet (PNG); return a link to the sheet."""
    store = worker_store()
    prefix = report_prefix(training_id)
    body = json.dumps([row.as_dict() for row in rows], indent=2).encode()
    store.put_bytes(f"{prefix}crops.json", body, "application/json")
    if not any(row.crop for row in rows):
        return None
    buffer = io.BytesIO()
    contact_sheet(rows, crop_dir).save(buffer, format="PNG")
    store.put_bytes(f"{prefix}contact_sheet.png", buffer.getvalue(), "image/png")
    return store.link(f"{prefix}contact_sheet.png", UI_LINK_EXPIRY_S)


@task(name="crop-faces")
@timed_stage
def crop_faces(params: TrainingParams, raw_paths: list[str]) -> list[str]:
    """Square crops at the base model's resolution, without faceless images or near-duplicates.

    Every dropped image is logged with its reason and listed in the stored report, the Prefect
    artifacts and the stage log; fewer than ``min_images`` remaining fails the run clearly.
    """
    from tasks import faces  # torch + MTCNN: only in the worker

    settings = worker_settings()
    entry = base_model(params.base_model_id)
    report_stage(params.training_id, TrainingStatus.DEPLOYING_GPU, "cropping", f"cropping {len(raw_paths)} images")
    crop_dir = workdir(params.training_id, "crops")
    results = faces.crop_images(
        [Path(p) for p in raw_paths], crop_dir, size=entry.resolution, mode=crop_mode(params),
        margin=settings.face_margin, max_pixels=settings.max_image_pixels,
    )
    cropped = [r.path for r in results if r.kept and r.path is not None]
    kept, duplicates = drop_near_duplicates(cropped, settings.duplicate_max_distance)
    rows = report_rows(results, duplicates)
    for row in rows:
        if not row.kept:
            run_logger().warning("image %s dropped: %s", row.source, row.reason)
    sheet_url = store_report(params.training_id, rows, crop_dir)
    # Waited for: created while the training asks for its GPU slot, these inserts made the slot's
    # request lose its race for the database more often (slot after 0.25 s median instead of 0.13).
    publish_artifacts(params.training_id, "crop-report", markdown_report(rows, sheet_url),
                      "kept and dropped training images", {"contact-sheet": sheet_url} if sheet_url else {}, wait=True)
    for duplicate in duplicates:
        duplicate.path.unlink(missing_ok=True)
    summary = summary_line(rows)
    report_stage(params.training_id, TrainingStatus.DEPLOYING_GPU, "cropped", summary)
    if len(kept) < settings.min_images:
        raise TooFewImages(f"only {len(kept)} usable image(s), at least {settings.min_images} needed ({summary})")
    store = worker_store()
    for path in kept:
        store.put_file(f"trainings/{params.training_id}/crops/{path.name}", path, "image/png")
    return [str(p) for p in kept]
