"""The create endpoints of the Train Model API (SPEC §2.1), and the sandbox create."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Header
from pydantic import ValidationError

from api.admission import Admission
from api.deps import AdmissionDep, Body, Owner, RegistryDep, SettingsDep, StoreDep
from api.errors import ApiError, invalid_input
from api.examples import CREATE_EXAMPLES, openapi_body
from api.gateway import TrainingRun
from api.schemas import (
    CreatedPublic, ErrorPublic, FineTuneRequest, FineTuneV2Request, LoraFineTuneRequest, TrainingRequest, is_clean_text,
)
from api.status import eta_text, job_seconds
from api.training_params import (
    DEFAULT_BASE_MODELS, SANDBOX_MODEL, bad_field, choose_base_model, dreambooth_params, dreambooth_v2_params,
    lora_params, sandbox_params,
)
from api.uploads import store_inline_images
from flows.netguard import AddressRefused, check_public_url
from flows.params import TrainingParams
from flows.records import training_prefix
from flows.registry import BaseModelEntry
from flows.settings import Settings
from flows.store import ObjectStore

DEPLOYMENTS = {"lora": "dreamflow-training/lora", "dreambooth": "dreamflow-training/dreambooth",
               "sandbox": "dreamflow-training/sandbox"}
ERRORS = {code: {"model": ErrorPublic} for code in (400, 401, 413, 503)} | {
    429: {"model": ErrorPublic, "description": "Too many trainings queued or running; see the Retry-After header",
          "headers": {"Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}}},
}
MAX_IDEMPOTENCY_KEY = 255
router = APIRouter(prefix="/api/v3", responses=ERRORS, tags=["train"])
sandbox_router = APIRouter(prefix="/api/sandbox/v3", responses=ERRORS, tags=["sandbox"])

RequestT = TypeVar("RequestT", bound=TrainingRequest)
Builder = Callable[[RequestT, str, Settings, BaseModelEntry], TrainingParams]
IdempotencyHeader = Annotated[str | None, Header(alias="Idempotency-Key")]


def parse(model: type[RequestT], body: dict) -> RequestT:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid_input(exc) from None


async def check_webhook(url: str | None, settings: Settings) -> None:
    """Refuse webhooks to private or loopback addresses unless configuration allows them."""
    if url is None or settings.allow_private_networks:
        return
    try:
        await asyncio.to_thread(check_public_url, url)
    except AddressRefused as exc:
        raise bad_field("webhook", str(exc)) from None


def check_idempotency_key(header: str | None, field: str | None) -> str | None:
    """The request's idempotency key (header first); 400 when the header is too long or not clean text."""
    if header is None:
        return field
    header = header.strip()
    if len(header) > MAX_IDEMPOTENCY_KEY or not is_clean_text(header):
        raise bad_field("Idempotency-Key", f"at most {MAX_IDEMPOTENCY_KEY} printable characters")
    return header or field


async def start_with_inputs(
    admission: Admission, store: ObjectStore, settings: Settings, deployment: str, params: TrainingParams,
    idempotency_key: str | None,
) -> TrainingRun:
    """Store the inline images, then queue the run within the queue limit; nothing stays behind when
    queueing fails or is refused."""
    admission.refuse_if_recently_full(idempotency_key)
    images = await store_inline_images(store, params.training_id, params.images, settings)
    params = params.model_copy(update={"images": images})
    try:
        run = await admission.start_training(deployment, params, idempotency_key)
    except BaseException:
        await asyncio.to_thread(store.delete_prefix, training_prefix(params.training_id))
        raise
    if run.training_id != params.training_id:  # an idempotent replay: the first run stands
        await asyncio.to_thread(store.delete_prefix, training_prefix(params.training_id))
        if run.deleted:  # Prefect keeps the key on the deleted run: answering with its id would name nothing
            raise ApiError(409, f"the idempotency key was used for training {run.training_id}, which has been "
                                "deleted; send the request with a new key to start another training")
    return run


async def create(
    req: TrainingRequest, params: TrainingParams, registry: dict[str, BaseModelEntry], deployment: str,
    settings: Settings, admission: Admission, store: ObjectStore, idempotency_key: str | None,
) -> CreatedPublic:
    """Queue a validated training and answer with its id and the time it is expected to take."""
    key = check_idempotency_key(idempotency_key, req.idempotency_key)
    await check_webhook(req.webhook, settings)
    run = await start_with_inputs(admission, store, settings, deployment, params, key)
    wait = await admission.queue.fresh_wait_for(run.training_id, run.created)  # the trainings ahead of it
    return CreatedPublic(data=f"it will take upto {eta_text(wait.seconds + first_estimate(run, params, registry))}.",
                         training_id=run.training_id, model_id=run.training_id)


def first_estimate(run: TrainingRun, params: TrainingParams, registry: dict[str, BaseModelEntry]) -> float:
    """The seconds the run's job is expected to take, from the parameters it was created with: an
    idempotent replay answers with the first request's estimate, not one for the repeated request."""
    first = params
    if run.training_id != params.training_id:
        with contextlib.suppress(ValidationError):
            first = TrainingParams.model_validate(run.parameters)
    entry = registry.get(first.base_model_id) or registry[params.base_model_id]
    return job_seconds(first.max_train_steps, entry.seconds_per_step)


@router.post("/lora_fine_tune", response_model=CreatedPublic, status_code=201,
             openapi_extra=openapi_body(LoraFineTuneRequest, CREATE_EXAMPLES["lora_fine_tune"]))
async def lora_fine_tune(body: Body, owner: Owner, settings: SettingsDep, admission: AdmissionDep,
                         registry: RegistryDep, store: StoreDep, idempotency_key: IdempotencyHeader = None) -> CreatedPublic:
    """Start a LoRA training on the submitted photos."""
    req = parse(LoraFineTuneRequest, body)
    entry = choose_base_model(req.base_model_id or DEFAULT_BASE_MODELS[req.base_model_type], registry)
    params = lora_params(req, owner, settings, entry)
    return await create(req, params, registry, DEPLOYMENTS["lora"], settings, admission, store, idempotency_key)


@router.post("/fine_tune", response_model=CreatedPublic, status_code=201,
             openapi_extra=openapi_body(FineTuneRequest, CREATE_EXAMPLES["fine_tune"]))
async def fine_tune(body: Body, owner: Owner, settings: SettingsDep, admission: AdmissionDep,
                    registry: RegistryDep, store: StoreDep, idempotency_key: IdempotencyHeader = None) -> CreatedPublic:
    """Start a DreamBooth training (full fine-tune of the UNet)."""
    req = parse(FineTuneRequest, body)
    entry = choose_base_model(req.base_model_id or DEFAULT_BASE_MODELS["normal"], registry)
    params = dreambooth_params(req, owner, settings, entry)
    return await create(req, params, registry, DEPLOYMENTS["dreambooth"], settings, admission, store, idempotency_key)


@router.post("/fine_tune_v2", response_model=CreatedPublic, status_code=201,
             openapi_extra=openapi_body(FineTuneV2Request, CREATE_EXAMPLES["fine_tune_v2"]))
async def fine_tune_v2(body: Body, owner: Owner, settings: SettingsDep, admission: AdmissionDep,
                       registry: RegistryDep, store: StoreDep, idempotency_key: IdempotencyHeader = None) -> CreatedPublic:
    """Start a DreamBooth training with separate UNet and text-encoder learning rates and steps."""
    req = parse(FineTuneV2Request, body)
    entry = choose_base_model(req.base_model_id or DEFAULT_BASE_MODELS["normal"], registry)
    params = dreambooth_v2_params(req, owner, settings, entry)
    return await create(req, params, registry, DEPLOYMENTS["dreambooth"], settings, admission, store, idempotency_key)


@sandbox_router.post("/fine_tune", response_model=CreatedPublic, status_code=201,
                     openapi_extra=openapi_body(LoraFineTuneRequest, CREATE_EXAMPLES["sandbox"]))
async def sandbox_fine_tune(body: Body, owner: Owner, settings: SettingsDep, admission: AdmissionDep,
                            registry: RegistryDep, store: StoreDep, idempotency_key: IdempotencyHeader = None) -> CreatedPublic:
    """The same flow on the built-in tiny model with a few steps: a fast end-to-end check for clients."""
    req = parse(LoraFineTuneRequest, body)
    entry = registry[SANDBOX_MODEL]
    params = sandbox_params(req, owner, settings, entry)
    return await create(req, params, registry, DEPLOYMENTS["sandbox"], settings, admission, store, idempotency_key)
