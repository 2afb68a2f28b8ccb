"""Stage 3: captions. Each caption contains the instance prompt; generated text is cached by image hash."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from flows.params import TrainingParams, TrainingStatus
from tasks import captioning
from tasks.context import report_stage, worker_settings, worker_store
from tasks.registration import timed_stage


@task(name="caption-images")
@timed_stage
def caption_images(params: TrainingParams, crop_paths: list[str]) -> list[str]:
    """One caption per crop from the configured captioner, stored as ``captions.json`` beside the crops.

    ``DREAMFLOW_CAPTIONER=instance`` gives the instance prompt alone; ``blip`` prefixes the
    instance prompt to a BLIP caption (``DREAMFLOW_CAPTION_MODEL``), cached in the store.
    """
    settings = worker_settings()
    store = worker_store()
    captioner = captioning.make_captioner(
        settings.captioner, settings.caption_model, settings.caption_max_new_tokens
    )
    outcome = captioning.caption_images(
        [Path(p) for p in crop_paths], params.instance_prompt, captioner, store
    )
    names = [p.rsplit("/", 1)[-1] for p in crop_paths]
    body = json.dumps(dict(zip(names, outcome.captions, strict=True)), indent=2)
    store.put_bytes(f"trainings/{params.training_id}/captions.json", body.encode(), "application/json")
    how = "the instance prompt" if captioner.cache_namespace is None else (
        f"{settings.captioner} ({outcome.cached} cached, {outcome.generated} generated)"
    )
    report_stage(
        params.training_id, TrainingStatus.DEPLOYING_GPU, "captioned", f"captioned {len(crop_paths)} images with {how}"
    )
    return outcome.captions
