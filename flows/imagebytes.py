"""Image bytes without an image library: format sniffing and ``data:`` URI decoding.

Light enough for the facade, which checks uploads before anything is stored or started.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse

STORE_SCHEME = "store:"
MIN_IMAGE_SIDE = 64  # pixels on the shorter side: smaller images hold nothing to train on


def too_small(width: int, height: int) -> str | None:
    """Why a ``width`` x ``height`` image is too small to train on, or None when it is large enough."""
    if min(width, height) >= MIN_IMAGE_SIDE:
        return None
    return f"too small: {width}x{height} pixels (at least {MIN_IMAGE_SIDE} on the shorter side)"


class InlineImageError(ValueError):
    """A ``data:`` URI or base64 payload that is not a usable image."""


def sniff_image_extension(head: bytes) -> str | None:
    """The file extension for the image format that ``head`` starts with, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if head[:2] == b"BM" and len(head) >= 14:
        return ".bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    return None


def decode_base64_image(payload: str, max_bytes: int) -> tuple[bytes, str]:
    """Decode a ``data:`` URI or bare base64 into bytes and their sniffed extension."""
    if payload[:5].lower() == "data:":
        header, sep, payload = payload.partition(",")
        if not sep:
            raise InlineImageError("malformed data: URI (no comma)")
        if not header.lower().endswith(";base64"):
            return _checked(urllib.parse.unquote_to_bytes(payload), max_bytes)
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise InlineImageError(f"image larger than {max_bytes // (1024 * 1024)} MB")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InlineImageError("not valid base64") from None
    return _checked(data, max_bytes)


def _checked(data: bytes, max_bytes: int) -> tuple[bytes, str]:
    if len(data) > max_bytes:
        raise InlineImageError(f"image larger than {max_bytes // (1024 * 1024)} MB")
    ext = sniff_image_extension(data[:16])
    if ext is None:
        raise InlineImageError(f"not an image (content starts with {data[:8]!r})")
    return data, ext
