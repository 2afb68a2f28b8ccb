"""The FastAPI facade: the Train Model API of SPEC §2 over Prefect and the object store."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from api import files, manage, routes, uploads
from api.admission import Admission
from api.cropper import Cropper
from api.errors import error_response, install_error_handlers
from api.fastpath import FastPathCounts, StatusFastPath
from api.gateway import GatewayUnavailable, PrefectGateway
from api.queueview import QueueView
from api.status import status_body
from api.statuscache import StatusCache
from flows.registry import load_registry
from flows.settings import Settings, get_settings
from flows.store import StorageError, StorageUnavailable, store_from_settings

log = logging.getLogger("dreamflow.api")


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, str(exc))


async def _storage_error(request: Request, exc: StorageError) -> JSONResponse:
    """503 for a store that cannot serve now (down, or refusing the configured credentials), 500 for
    anything else; the details (hosts, keys, the server's words) go to the facade's log only."""
    if isinstance(exc, StorageUnavailable):
        log.warning("storage unavailable for %s: %s", request.url.path, exc)
        return error_response(503, "storage is unreachable; try again later")
    log.error("storage error for %s: %s", request.url.path, exc)
    return error_response(500, "storage error; the request was not processed")


ALWAYS_POSSIBLE = {
    "400": "Invalid input: a body that is not a JSON object or form, or a field that fails validation",
    "401": "Missing or unknown API key",
    "413": "Request body larger than the limit",
    "503": "The orchestrator (Prefect) or the object store is unreachable",
}


def openapi_with_real_errors(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document, with the errors the facade really sends.

    Every route reads the body and the key itself, so each may answer 400, 401, 413 and 503 in the
    error shape (``ErrorPublic``); none ever answers FastAPI's default 422, which is turned into 400.
    """
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        error_ref = {"$ref": "#/components/schemas/ErrorPublic"}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for code, description in ALWAYS_POSSIBLE.items():
                    responses.setdefault(code, {"description": description,
                                                "content": {"application/json": {"schema": error_ref}}})
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the facade; settings are read from the environment unless given."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.registry = load_registry(settings.registry_file)
        app.state.store = store_from_settings(settings)
        app.state.cropper = Cropper()
        app.state.status_fast_path = FastPathCounts()
        try:
            async with PrefectGateway(settings.prefect_api) as gateway:
                app.state.gateway = gateway
                app.state.queue = QueueView(gateway, app.state.registry, settings.gpu_slots)
                app.state.queue.attach(asyncio.get_running_loop())
                app.state.status_cache = StatusCache(functools.partial(
                    status_body, app.state.store, settings, app.state.registry, app.state.queue.wait_for))
                app.state.admission = Admission(gateway, settings.max_queued, settings.queue_retry_after_s,
                                                app.state.queue, settings.max_queued_per_key)
                # Prefect's import leaves ~10^5 long-lived objects; frozen, full collections stop
                # walking them (they were the status endpoint's slowest answers under load).
                gc.collect()
                gc.freeze()
                yield
        finally:
            app.state.cropper.close()

    app = FastAPI(
        title="dreamflow",
        description="Self-hosted DreamBooth / LoRA training behind the Stable Diffusion API 'Train Model' endpoints.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_exception_handler(GatewayUnavailable, _unavailable)
    app.add_exception_handler(StorageError, _storage_error)  # type: ignore[arg-type]
    for router in (routes.router, routes.sandbox_router, manage.router, manage.sandbox_router, uploads.router):
        app.include_router(router)
    app.include_router(files.router)
    app.add_middleware(StatusFastPath)  # cached status polls answered before FastAPI's routing
    app.openapi = lambda: openapi_with_real_errors(app)  # type: ignore[method-assign]
    return app
