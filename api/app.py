"""The FastAPI facade: the Train Model API of SPEC §2 over Prefect and the object store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api import files, manage, routes, uploads
from api.cropper import Cropper
from api.errors import error_response, install_error_handlers
from api.gateway import GatewayUnavailable, PrefectGateway
from api.statuscache import StatusCache
from flows.registry import load_registry
from flows.settings import Settings, get_settings
from flows.store import StorageError, StorageUnavailable, store_from_settings


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, str(exc))


async def _storage_error(request: Request, exc: StorageError) -> JSONResponse:
    if isinstance(exc, StorageUnavailable):
        return error_response(503, f"storage is unreachable: {exc}")
    return error_response(500, "storage error; the request was not processed")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the facade; settings are read from the environment unless given."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.registry = load_registry(settings.registry_file)
        app.state.store = store_from_settings(settings)
        app.state.cropper = Cropper()
        app.state.status_cache = StatusCache()
        try:
            async with PrefectGateway(settings.prefect_api) as gateway:
                app.state.gateway = gateway
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
    return app
