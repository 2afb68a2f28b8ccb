"""From a validated create request to the flow's parameters: base model, method, steps, rates."""

from __future__ import annotations

import secrets
import string

from api.errors import ApiError
from api.schemas import FineTuneRequest, FineTuneV2Request, LoraFineTuneRequest, TrainingRequest
from flows.params import TrainingParams, default_train_steps
from flows.registry import BaseModelEntry
from flows.settings import Settings

DEFAULT_BASE_MODELS = {"normal": "sd-1.5", "sdxl": "sdxl"}
TRAINABLE_FAMILIES = {"sd15", "sd2", "sdxl"}
ID_ALPHABET = string.ascii_letters + string.digits
SANDBOX_MODEL = "tiny"


def new_training_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(10))


def bad_field(field: str, reason: str) -> ApiError:
    return ApiError(400, f"invalid request: {field}: {reason}", {field: [reason]})


def choose_base_model(model_id: str, registry: dict[str, BaseModelEntry]) -> BaseModelEntry:
    """The registry entry a request trains on; 400 for unknown or not-yet-trainable models."""
    entry = registry.get(model_id)
    if entry is None:
        raise bad_field("base_model_id", f"unknown base model {model_id!r}; known: {', '.join(sorted(registry))}")
    if entry.family not in TRAINABLE_FAMILIES:
        raise bad_field("base_model_id", f"{entry.family} models cannot be trained on this deployment yet")
    return entry


def _steps(requested: int | None, image_count: int, settings: Settings, field: str = "max_train_steps") -> int:
    limit = settings.max_train_steps_limit
    steps = requested or default_train_steps(image_count, limit)
    if steps > limit:
        raise bad_field(field, f"at most {limit} on this deployment")
    return steps


def _common(req: TrainingRequest, owner: str, settings: Settings, entry: BaseModelEntry) -> dict[str, object]:
    if len(req.images) > settings.max_images:
        raise bad_field("images", f"at most {settings.max_images} images per training")
    return {
        "training_id": new_training_id(), "owner": owner, "instance_prompt": req.instance_prompt,
        "class_prompt": req.class_prompt, "base_model_id": entry.id, "images": req.images,
        "seed": req.seed if req.seed is not None else secrets.randbelow(2**31),
        "training_type": req.training_type, "webhook": req.webhook,
    }


def lora_params(req: LoraFineTuneRequest, owner: str, settings: Settings, entry: BaseModelEntry) -> TrainingParams:
    """Flow parameters of a LoRA request."""
    return TrainingParams(
        **_common(req, owner, settings, entry), method=req.lora_type, negative_prompt=req.negative_prompt,
        max_train_steps=_steps(req.max_train_steps, len(req.images), settings),
        learning_rate=entry.lora_learning_rate,
    )


def dreambooth_params(req: FineTuneRequest, owner: str, settings: Settings, entry: BaseModelEntry) -> TrainingParams:
    """Flow parameters of a ``fine_tune`` request (UNet only, the model's default rate)."""
    return TrainingParams(
        **_common(req, owner, settings, entry), method="dreambooth",
        max_train_steps=_steps(req.max_train_steps, len(req.images), settings),
        learning_rate=entry.dreambooth_learning_rate, half_precision=req.half_precision,
    )


def dreambooth_v2_params(req: FineTuneV2Request, owner: str, settings: Settings, entry: BaseModelEntry) -> TrainingParams:
    """Flow parameters of a ``fine_tune_v2`` request (separate UNet / text-encoder rates and steps)."""
    steps = _steps(req.steps_unet, len(req.images), settings, "steps_unet")
    if req.steps_text_encoder > steps:
        raise bad_field("steps_text_encoder", f"at most steps_unet ({steps})")
    if req.steps_text_encoder and entry.family == "sdxl":
        raise bad_field("steps_text_encoder", "text-encoder training is not available for SDXL models; send 0")
    return TrainingParams(
        **_common(req, owner, settings, entry), method="dreambooth", max_train_steps=steps,
        learning_rate=req.learning_rate_unet, text_encoder_learning_rate=req.learning_rate_text_encoder,
        text_encoder_steps=req.steps_text_encoder, half_precision=req.half_precision,
    )


def sandbox_params(req: TrainingRequest, owner: str, settings: Settings, entry: BaseModelEntry) -> TrainingParams:
    """The same request on the tiny model with the configured few steps: a free end-to-end check."""
    return TrainingParams(
        **_common(req, owner, settings, entry), method="lora", max_train_steps=settings.sandbox_steps,
        learning_rate=entry.lora_learning_rate, negative_prompt=getattr(req, "negative_prompt", None),
    )
