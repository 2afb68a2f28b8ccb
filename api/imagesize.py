"""An image's width and height read from its header, without decoding it (and without PIL).

The facade refuses decompression bombs (a few kB of PNG declaring 50000 x 50000 pixels) before
anything is stored or started; the worker still checks again when it decodes.
"""

from __future__ import annotations

from collections.abc import Callable

# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are not frames.
JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
JPEG_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}
TIFF_WIDTH, TIFF_HEIGHT = 256, 257
TIFF_SHORT, TIFF_LONG = 3, 4


class ImageSizeError(ValueError):
    """The header does not say how large the image is: truncated or not really that format."""


def _le(data: bytes, start: int, size: int) -> int:
    return int.from_bytes(data[start:start + size], "little")


def _be(data: bytes, start: int, size: int) -> int:
    return int.from_bytes(data[start:start + size], "big")


def _png(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return _be(data, 16, 4), _be(data, 20, 4)


def _gif(data: bytes) -> tuple[int, int] | None:
    return (_le(data, 6, 2), _le(data, 8, 2)) if len(data) >= 10 else None


def _bmp(data: bytes) -> tuple[int, int] | None:
    if len(data) < 26:
        return None
    if _le(data, 14, 4) == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return _le(data, 18, 2), _le(data, 20, 2)
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)  # negative: stored top-down
    return abs(width), abs(height)


def _webp(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return _le(data, 26, 2) & 0x3FFF, _le(data, 28, 2) & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = _le(data, 21, 4)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return _le(data, 24, 3) + 1, _le(data, 27, 3) + 1
    return None


def _jpeg(data: bytes) -> tuple[int, int] | None:
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in JPEG_STANDALONE:
            at += 2
            continue
        if marker in JPEG_FRAMES:
            return (_be(data, at + 7, 2), _be(data, at + 5, 2)) if at + 9 <= len(data) else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        at += 2 + _be(data, at + 2, 2)
    return None


def _tiff(data: bytes) -> tuple[int, int] | None:
    order = "little" if data[:2] == b"II" else "big"

    def read(start: int, size: int) -> int:
        return int.from_bytes(data[start:start + size], order)  # type: ignore[arg-type]

    ifd = read(4, 4)
    if ifd < 8 or ifd + 2 > len(data):
        return None
    found: dict[int, int] = {}
    for index in range(read(ifd, 2)):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(data):
            break
        tag, kind = read(entry, 2), read(entry + 2, 2)
        if tag in (TIFF_WIDTH, TIFF_HEIGHT) and kind in (TIFF_SHORT, TIFF_LONG):
            found[tag] = read(entry + 8, 2 if kind == TIFF_SHORT else 4)
    if TIFF_WIDTH in found and TIFF_HEIGHT in found:
        return found[TIFF_WIDTH], found[TIFF_HEIGHT]
    return None


READERS: dict[str, Callable[[bytes], tuple[int, int] | None]] = {
    ".png": _png, ".gif": _gif, ".bmp": _bmp, ".webp": _webp, ".jpg": _jpeg, ".tif": _tiff,
}


def image_size(data: bytes, ext: str) -> tuple[int, int]:
    """``(width, height)`` declared by the header of an image whose format sniffed as ``ext``."""
    reader = READERS.get(ext)
    size = reader(data) if reader else None
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise ImageSizeError("the image header is truncated or corrupt (no usable width and height)")
    return size


def check_pixels(data: bytes, ext: str, max_pixels: int) -> tuple[int, int]:
    """The image's size; :class:`ImageSizeError` when unreadable or over ``max_pixels``."""
    width, height = image_size(data, ext)
    if width * height > max_pixels:
        raise ImageSizeError(
            f"image larger than {max_pixels / 1e6:g} MP ({width}x{height} pixels declared)"
        )
    return width, height
