"""Uploaded images: ``base64_crop``, and inline ``data:`` images checked and stored before a run starts.

Flow parameters carry references, never image bytes: each inline image becomes an object under
``trainings/<id>/inputs/`` and the request names it as ``store:<key>``.
"""

from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter, Request
from pydantic import ValidationError

from api.deps import Body, Owner, RegistryDep, SettingsDep, StoreDep
from api.errors import ApiError, invalid_input
from api.examples import BASE64_CROP_EXAMPLE, openapi_body
from api.schemas import Base64CropRequest, ErrorPublic, UploadPublic
from api.training_params import DEFAULT_BASE_MODELS
from api.imagesize import ImageSizeError, check_pixels
from flows.imagebytes import STORE_SCHEME, InlineImageError, decode_base64_image, too_small
from flows.settings import Settings
from flows.store import ObjectStore

MIME = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif",
        ".bmp": "image/bmp", ".tif": "image/tiff"}


def decode_checked_image(payload: str, max_bytes: int, max_pixels: int) -> tuple[bytes, str]:
    """Bytes and extension of a base64 image whose header declares at most ``max_pixels`` pixels, and
    at least MIN_IMAGE_SIDE on its shorter side."""
    data, ext = decode_base64_image(payload, max_bytes)
    try:
        width, height = check_pixels(data, ext, max_pixels)
    except ImageSizeError as exc:
        raise InlineImageError(str(exc)) from None
    if problem := too_small(width, height):
        raise InlineImageError(problem)
    return data, ext


def decode_inline_images(images: list[str], max_bytes: int, max_pixels: int) -> dict[int, tuple[bytes, str]]:
    """Decode every ``data:`` entry; a 400 naming each bad entry when any is unusable."""
    decoded: dict[int, tuple[bytes, str]] = {}
    problems: list[str] = []
    for index, image in enumerate(images):
        if not image.startswith("data:"):
            continue
        try:
            decoded[index] = decode_checked_image(image, max_bytes, max_pixels)
        except InlineImageError as exc:
            problems.append(f"entry {index}: {exc}")
    if problems:
        raise ApiError(400, f"invalid request: images: {'; '.join(problems)}", {"images": problems})
    return decoded


async def store_inline_images(store: ObjectStore, training_id: str, images: list[str], settings: Settings) -> list[str]:
    """``images`` with each ``data:`` URI replaced by a ``store:`` reference to its stored copy."""
    decoded = decode_inline_images(images, settings.max_image_bytes, settings.max_image_pixels)
    result = list(images)
    for index, (data, ext) in decoded.items():
        key = f"trainings/{training_id}/inputs/{index:02d}{ext}"
        await asyncio.to_thread(store.put_bytes, key, data, MIME[ext])
        result[index] = STORE_SCHEME + key
    return result


BASE64_MAX_BYTES = 5 * 1024 * 1024
router = APIRouter(prefix="/api/v3", tags=["uploads"],
                   responses={code: {"model": ErrorPublic} for code in (400, 401, 413, 503)})


@router.post("/base64_crop", response_model=UploadPublic, openapi_extra=openapi_body(Base64CropRequest, BASE64_CROP_EXAMPLE))
async def base64_crop(
    request: Request, body: Body, owner: Owner, store: StoreDep, settings: SettingsDep, registry: RegistryDep
) -> UploadPublic:
    """Upload one image (optionally face-cropped to the training resolution); the link works in ``images``."""
    try:
        req = Base64CropRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_input(exc) from None
    try:
        data, ext = decode_checked_image(req.image, BASE64_MAX_BYTES, settings.max_image_pixels)
    except InlineImageError as exc:
        status = 413 if "larger than" in str(exc) else 400
        raise ApiError(status, f"invalid request: image: {exc}", {"image": [str(exc)]}) from None
    if req.crop:
        resolution = registry[DEFAULT_BASE_MODELS["normal"]].resolution
        data, ext = await request.app.state.cropper.crop(data, resolution, settings.max_image_pixels), ".png"
    request_id = secrets.randbelow(10**9)
    key = f"uploads/{owner}/{request_id}{ext}"
    await asyncio.to_thread(store.put_bytes, key, data, MIME[ext])
    return UploadPublic(link=store.link(key, settings.link_expiry_s), request_id=request_id)
