"""Inline images (``data:`` URIs) are checked and stored before a flow run is created.

Flow parameters carry references, never image bytes: each inline image becomes an object under
``trainings/<id>/inputs/`` and the request names it as ``store:<key>``.
"""

from __future__ import annotations

import asyncio

from api.errors import ApiError
from flows.imagebytes import STORE_SCHEME, InlineImageError, decode_base64_image
from flows.store import ObjectStore

MIME = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif",
        ".bmp": "image/bmp", ".tif": "image/tiff"}


def decode_inline_images(images: list[str], max_bytes: int) -> dict[int, tuple[bytes, str]]:
    """Decode every ``data:`` entry; a 400 naming each bad entry when any is unusable."""
    decoded: dict[int, tuple[bytes, str]] = {}
    problems: list[str] = []
    for index, image in enumerate(images):
        if not image.startswith("data:"):
            continue
        try:
            decoded[index] = decode_base64_image(image, max_bytes)
        except InlineImageError as exc:
            problems.append(f"entry {index}: {exc}")
    if problems:
        raise ApiError(400, f"invalid request: images: {'; '.join(problems)}", {"images": problems})
    return decoded


async def store_inline_images(store: ObjectStore, training_id: str, images: list[str], max_bytes: int) -> list[str]:
    """``images`` with each ``data:`` URI replaced by a ``store:`` reference to its stored copy."""
    decoded = decode_inline_images(images, max_bytes)
    result = list(images)
    for index, (data, ext) in decoded.items():
        key = f"trainings/{training_id}/inputs/{index:02d}{ext}"
        await asyncio.to_thread(store.put_bytes, key, data, MIME[ext])
        result[index] = STORE_SCHEME + key
    return result
