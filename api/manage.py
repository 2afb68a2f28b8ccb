"""Status, list, cancel and delete (SPEC §2.3-2.4)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from prefect.client.schemas.objects import StateType

from api.deps import AdmissionDep, GatewayDep, Owner, StoreDep
from api.errors import NOT_FOUND, ApiError
from api.examples import KEY_ONLY_EXAMPLE, openapi_body
from api.gateway import ACTIVE, PrefectGateway, TrainingRun
from api.schemas import ClientRequest, ErrorPublic, ListPublic, MessagePublic, StatusPublic
from api.statuscache import StatusCache
from flows.records import read_manifest, training_prefix
from flows.store import ObjectStore, StorageError

ERRORS = {code: {"model": ErrorPublic} for code in (401, 404, 409, 503)}
KEY_BODY = openapi_body(ClientRequest, KEY_ONLY_EXAMPLE)
router = APIRouter(prefix="/api/v3", responses=ERRORS, tags=["manage"])
sandbox_router = APIRouter(prefix="/api/sandbox/v3", responses=ERRORS, tags=["sandbox"])
CANCELLED = {StateType.CANCELLED, StateType.CANCELLING}


async def owned_run(gateway: PrefectGateway, training_id: str, owner: str) -> TrainingRun:
    """The caller's training, or 404 for unknown ids and other callers' ids alike."""
    run = await gateway.find_training(training_id, owner) if len(training_id) <= 64 else None
    if run is None:
        raise ApiError(404, NOT_FOUND)
    return run


@router.post("/fine_tune_status/{training_id}", response_model=StatusPublic, openapi_extra=KEY_BODY)
async def fine_tune_status(request: Request, training_id: str, owner: Owner, gateway: GatewayDep) -> Response:
    """Status, progress, ETA, error and links of one of the caller's trainings."""
    run = await owned_run(gateway, training_id, owner)
    cache: StatusCache = request.app.state.status_cache  # composes with api.status.status_body
    return Response(content=await cache.body(training_id, owner, run), media_type="application/json")


sandbox_router.add_api_route("/fine_tune_status/{training_id}", fine_tune_status, methods=["POST"],
                             response_model=StatusPublic, openapi_extra=KEY_BODY)


@router.post("/finetune_list", response_model=ListPublic, openapi_extra=KEY_BODY)
async def finetune_list(owner: Owner, gateway: GatewayDep) -> ListPublic:
    """Ids of the caller's trainings, newest first."""
    return ListPublic(data=[run.training_id for run in await gateway.list_trainings(owner)])


async def cancel_training(training_id: str, owner: Owner, gateway: GatewayDep, store: StoreDep,
                          admission: AdmissionDep) -> MessagePublic:
    """Cancel a queued or running training; its partial artifacts are removed afterwards."""
    run = await owned_run(gateway, training_id, owner)
    admission.queue.forget(training_id)
    if run.state not in CANCELLED:
        if await asyncio.to_thread(read_manifest, store, training_id) is not None:
            raise ApiError(409, f"training {training_id} already ended (model_ready); delete the model instead")
        if run.state not in ACTIVE:
            state = run.state.value.lower() if run.state else "finished"
            raise ApiError(409, f"training {training_id} already ended ({state}); only queued or running trainings can be cancelled")
        started = await gateway.cancel_training(run, owner)
        # The cleanup run tells the webhook and removes the files once the run has stopped; one that
        # never started has its inputs removed now as well, even while every worker is busy.
        await gateway.start_cleanup(training_id, run, "cancelled")
        if not started:
            await remove_now(store, training_id)
    return MessagePublic(messege="training cancelled", data=f"training {training_id} cancelled")


for _path in ("/cancle_training/{training_id}", "/cancel_training/{training_id}"):
    router.add_api_route(_path, cancel_training, methods=["POST"], response_model=MessagePublic, openapi_extra=KEY_BODY)


@router.post("/finetune/delete/{training_id}", response_model=MessagePublic, openapi_extra=KEY_BODY)
async def delete_training(training_id: str, owner: Owner, gateway: GatewayDep, store: StoreDep,
                          admission: AdmissionDep) -> MessagePublic:
    """Cancel the training if it runs, forget its id at once, and remove every stored artifact."""
    run = await gateway.forget_training(await owned_run(gateway, training_id, owner), owner)
    admission.queue.forget(training_id)
    going = run.state in ACTIVE
    if going:
        running = await gateway.cancel_training(run, owner)
    else:
        running = run.state == StateType.CANCELLING
    # removes the files once no process writes them; a training still going ends cancelled: its webhook hears so
    await gateway.start_cleanup(training_id, run, "deleted", tell_webhook=going)
    removed = not running and await remove_now(store, training_id)
    files = "its files are removed" if removed else "its files are being removed"
    return MessagePublic(messege="model deleted", data=f"model {training_id} deleted; {files}")


async def remove_now(store: ObjectStore, training_id: str) -> bool:
    """Remove an ended training's files before answering, even while the workers are busy (and so
    every link to them stops working); False when the store cannot now, and the cleanup run will."""
    try:
        await asyncio.to_thread(store.delete_prefix, training_prefix(training_id))
    except StorageError:
        return False
    return True
