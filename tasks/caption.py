"""Stage 3: captions. Each caption contains the instance prompt; it is the caption for now."""

from __future__ import annotations

import json

from prefect import task

from flows.params import TrainingParams
from tasks.context import worker_store


@task(name="caption-images")
def caption_images(params: TrainingParams, crop_paths: list[str]) -> list[str]:
    """One caption per crop (the instance prompt), stored beside the crops."""
    captions = [params.instance_prompt for _ in crop_paths]
    body = json.dumps(dict(zip((p.rsplit("/", 1)[-1] for p in crop_paths), captions, strict=True)), indent=2)
    worker_store().put_bytes(f"trainings/{params.training_id}/captions.json", body.encode(), "application/json")
    return captions
