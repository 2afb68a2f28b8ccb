"""Hostile payloads for the facade: decompression bombs, oversized and malformed bodies.

Built on demand (a 20 MB body is not kept around at collection time).
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid-looking PNG of a few hundred bytes that declares ``width`` x ``height`` RGB pixels.

    Its IDAT holds the first rows only (all zeros, deflated); a decoder that trusts the header
    would allocate width x height x 3 bytes (7.5 GB for the default) before finding that out.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 8, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def small_jpeg(side: int = 16) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 80, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def jpeg_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A real small JPEG whose frame header (SOF0) is rewritten to declare ``width`` x ``height``."""
    data = bytearray(small_jpeg())
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_bomb() -> bytes:
    """A GIF whose logical screen is 65535 x 65535."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("P", (4, 4)).save(buffer, format="GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def nested_json(depth: int, key: str) -> bytes:
    """``{"key": ..., "instance_prompt": [[[...]]]}`` nested ``depth`` levels deep."""
    return (f'{{"key": "{key}", "instance_prompt": ' + "[" * depth + "]" * depth + "}").encode()


def huge_json(size: int, key: str) -> bytes:
    """A syntactically valid JSON object of about ``size`` bytes (one long prompt)."""
    return f'{{"key": "{key}", "instance_prompt": "{"a" * size}"}}'.encode()


def chunks(body: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    """The body as a stream of chunks: httpx sends it chunked, with no Content-Length."""
    for start in range(0, len(body), size):
        yield body[start:start + size]
