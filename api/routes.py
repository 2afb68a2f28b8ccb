"""The Train Model endpoints (SPEC §2)."""

from __future__ import annotations

import asyncio
import secrets
import string
from typing import Annotated

from fastapi import APIRouter, Header
from pydantic import ValidationError

from api.deps import Body, GatewayDep, Owner, RegistryDep, SettingsDep, StoreDep
from api.errors import NOT_FOUND, ApiError, invalid_input
from api.gateway import PrefectGateway, TrainingRun
from api.schemas import CreatedPublic, ErrorPublic, ListPublic, LoraFineTuneRequest, StatusPublic
from api.status import compose_status, eta_text, job_seconds
from api.uploads import store_inline_images
from flows.params import TrainingParams, default_train_steps
from flows.records import read_manifest, read_stage, training_prefix
from flows.store import ObjectStore
from flows.registry import BaseModelEntry
from flows.settings import Settings

LORA_DEPLOYMENT = "dreamflow-lora/lora"
DEFAULT_BASE_MODELS = {"normal": "sd-1.5", "sdxl": "sdxl"}
TRAINABLE_FAMILIES = {"sd15", "sd2"}
ID_ALPHABET = string.ascii_letters + string.digits

ERRORS = {code: {"model": ErrorPublic} for code in (400, 401, 404, 413, 503)}
router = APIRouter(prefix="/api/v3", responses=ERRORS)


def new_training_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(10))


def _bad(field: str, reason: str) -> ApiError:
    return ApiError(400, f"invalid request: {field}: {reason}", {field: [reason]})


def choose_base_model(req: LoraFineTuneRequest, registry: dict[str, BaseModelEntry]) -> BaseModelEntry:
    """The registry entry a request trains on; 400 for unknown or not-yet-trainable models."""
    model_id = req.base_model_id or DEFAULT_BASE_MODELS[req.base_model_type]
    entry = registry.get(model_id)
    if entry is None:
        raise _bad("base_model_id", f"unknown base model {model_id!r}; known: {', '.join(sorted(registry))}")
    if entry.family not in TRAINABLE_FAMILIES:
        raise _bad("base_model_id", f"{entry.family} models cannot be trained on this deployment yet")
    return entry


def lora_params(req: LoraFineTuneRequest, owner: str, settings: Settings, entry: BaseModelEntry) -> TrainingParams:
    """Validated flow parameters for a LoRA request."""
    if req.lora_type != "lora":
        raise _bad("lora_type", "lycoris training is not available on this deployment yet; use 'lora'")
    if len(req.images) > settings.max_images:
        raise _bad("images", f"at most {settings.max_images} images per training")
    limit = settings.max_train_steps_limit
    steps = req.max_train_steps or default_train_steps(len(req.images), limit)
    if steps > limit:
        raise _bad("max_train_steps", f"at most {limit} on this deployment")
    return TrainingParams(
        training_id=new_training_id(), owner=owner, method="lora", instance_prompt=req.instance_prompt,
        class_prompt=req.class_prompt, negative_prompt=req.negative_prompt, base_model_id=entry.id,
        images=req.images, seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
        training_type=req.training_type, max_train_steps=steps, webhook=req.webhook,
        learning_rate=entry.lora_learning_rate,
    )


async def start_with_inputs(
    gateway: PrefectGateway, store: ObjectStore, settings: Settings, params: TrainingParams, idempotency_key: str | None
) -> TrainingRun:
    """Store the inline images, then queue the run; nothing stays behind when queueing fails."""
    images = await store_inline_images(store, params.training_id, params.images, settings.max_image_bytes)
    params = params.model_copy(update={"images": images})
    try:
        run = await gateway.start_training(LORA_DEPLOYMENT, params, idempotency_key)
    except BaseException:
        await asyncio.to_thread(store.delete_prefix, training_prefix(params.training_id))
        raise
    if run.training_id != params.training_id:  # an idempotent replay: the first run stands
        await asyncio.to_thread(store.delete_prefix, training_prefix(params.training_id))
    return run


@router.post("/lora_fine_tune", response_model=CreatedPublic, status_code=201)
async def lora_fine_tune(
    body: Body, owner: Owner, settings: SettingsDep, gateway: GatewayDep, registry: RegistryDep, store: StoreDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> CreatedPublic:
    """Start a LoRA training on the submitted photos."""
    try:
        req = LoraFineTuneRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_input(exc) from None
    entry = choose_base_model(req, registry)
    params = lora_params(req, owner, settings, entry)
    run = await start_with_inputs(gateway, store, settings, params, idempotency_key or req.idempotency_key)
    seconds = job_seconds(params.max_train_steps, entry.seconds_per_step)
    return CreatedPublic(
        data=f"it will take upto {eta_text(seconds)}.", training_id=run.training_id, model_id=run.training_id
    )


@router.post("/fine_tune_status/{training_id}", response_model=StatusPublic)
async def fine_tune_status(
    training_id: str, owner: Owner, gateway: GatewayDep, store: StoreDep, settings: SettingsDep, registry: RegistryDep
) -> StatusPublic:
    """Status, progress, ETA and links of one of the caller's trainings."""
    run = await gateway.find_training(training_id, owner)
    if run is None:
        raise ApiError(404, NOT_FOUND)
    stage, manifest = await asyncio.gather(
        asyncio.to_thread(read_stage, store, training_id), asyncio.to_thread(read_manifest, store, training_id)
    )
    entry = registry.get(str(run.parameters.get("base_model_id")))
    return compose_status(
        run, stage, manifest,
        lambda key: store.link(key, settings.link_expiry_s),
        entry.seconds_per_step if entry else 1.0,
    )


@router.post("/finetune_list", response_model=ListPublic)
async def finetune_list(owner: Owner, gateway: GatewayDep) -> ListPublic:
    """Ids of the caller's trainings, newest first."""
    return ListPublic(data=[run.training_id for run in await gateway.list_trainings(owner)])
