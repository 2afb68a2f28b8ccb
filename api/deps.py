"""Typed dependencies of the routes: settings, gateway, store, the parsed body and the caller."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Request

from api.admission import Admission
from api.errors import INVALID_KEY, ApiError
from api.gateway import PrefectGateway
from api.schemas import is_clean_text
from flows.registry import BaseModelEntry
from flows.settings import Settings, hash_key
from flows.store import ObjectStore

MAX_BODY_BYTES = 8 * 1024 * 1024  # a 5 MB image as base64, plus the rest of the body
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
LIST_FIELDS = {"images"}


# The accessors are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread
# pool, and four thread hops per request cost more than the rest of a cached status answer.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_gateway(request: Request) -> PrefectGateway:
    return request.app.state.gateway


async def get_admission(request: Request) -> Admission:
    return request.app.state.admission


async def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


async def get_registry(request: Request) -> dict[str, BaseModelEntry]:
    return request.app.state.registry


def _too_large() -> ApiError:
    return ApiError(413, f"request body larger than {MAX_BODY_BYTES // (1024 * 1024)} MB")


async def _capped_body(request: Request) -> bytes:
    """The raw body, read in chunks and refused as soon as it passes :data:`MAX_BODY_BYTES`.

    A declared ``Content-Length`` over the cap is refused before reading; a chunked body (no
    length) is cut off at the cap instead of being buffered whole.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    raw = b"".join(chunks)
    request._body = raw  # Starlette's own cache: request.form() parses these bytes instead of the spent stream
    return raw


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", {"body": ["nested too deeply"]}) from None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError, and ints past Python's digit limit
        raise ApiError(400, "request body is not valid JSON", {"body": ["not valid JSON"]}) from None


async def read_body(request: Request) -> dict[str, Any]:
    """The request body as a dict, from JSON or a form; empty bodies are ``{}``."""
    raw = await _capped_body(request)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(FORM_TYPES):
        form = await request.form()
        return {k: form.getlist(k) if k in LIST_FIELDS else form.get(k) for k in form.keys()}
    if not raw.strip():
        return {}
    body = _parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", {"body": ["must be a JSON object"]})
    return body


def presented_key(body: dict[str, Any], authorization: str) -> str | None:
    """The key the caller sent: the body's ``key`` first, else an ``Authorization: Bearer`` token."""
    key = body.get("key")
    if isinstance(key, str) and key.strip():
        return key.strip() if is_clean_text(key) else None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def owner_of(key: str | None, accepted_hashes: frozenset[str]) -> str | None:
    """The owner (key hash) of an accepted key; None for a missing or unknown one."""
    if key is None:
        return None
    owner = hash_key(key)
    return owner if owner in accepted_hashes else None


async def current_owner(
    request: Request, body: Annotated[dict[str, Any], Depends(read_body)], settings: Annotated[Settings, Depends(get_settings)]
) -> str:
    """The hash of the caller's API key; 401 when it is missing or unknown."""
    owner = owner_of(presented_key(body, request.headers.get("authorization", "")), settings.api_key_hashes)
    if owner is None:
        raise ApiError(401, INVALID_KEY)
    return owner


Body = Annotated[dict[str, Any], Depends(read_body)]
Owner = Annotated[str, Depends(current_owner)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
GatewayDep = Annotated[PrefectGateway, Depends(get_gateway)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
RegistryDep = Annotated[dict[str, BaseModelEntry], Depends(get_registry)]
