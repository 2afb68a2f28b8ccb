"""Image sizes read from headers (the facade's bomb check) agree with Pillow on every format it sniffs."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from api.imagesize import ImageSizeError, check_pixels, image_size
from flows.imagebytes import sniff_image_extension
from hostile_inputs import gif_bomb, jpeg_bomb, png_bomb


def _encoded(fmt: str, mode: str = "RGB", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (123, 45), 7 if mode == "P" else None).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(("fmt", "mode", "options"), [
    ("PNG", "RGB", {}), ("JPEG", "RGB", {}), ("JPEG", "RGB", {"progressive": True}), ("JPEG", "L", {}),
    ("GIF", "P", {}), ("BMP", "RGB", {}), ("WEBP", "RGB", {}), ("WEBP", "RGB", {"lossless": True}),
    ("WEBP", "RGBA", {}), ("TIFF", "RGB", {}),
])
def test_header_size_matches_pillow(fmt: str, mode: str, options: dict) -> None:
    data = _encoded(fmt, mode, **options)
    assert image_size(data, sniff_image_extension(data[:16]) or "?") == (123, 45)


def test_jpeg_with_exif_before_the_frame_header() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (123, 45)).save(buffer, format="JPEG", exif=exif)
    assert image_size(buffer.getvalue(), ".jpg") == (123, 45)


@pytest.mark.parametrize(("data", "ext", "size"), [
    (png_bomb(), ".png", (50_000, 50_000)), (jpeg_bomb(), ".jpg", (60_000, 60_000)), (gif_bomb(), ".gif", (65_535, 65_535)),
])
def test_bombs_are_refused_by_their_header(data: bytes, ext: str, size: tuple[int, int]) -> None:
    assert image_size(data, ext) == size
    with pytest.raises(ImageSizeError, match="larger than 40 MP"):
        check_pixels(data, ext, 40_000_000)


@pytest.mark.parametrize(("data", "ext"), [
    (b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff\xe0\x00\x10JFIF", ".jpg"), (b"GIF89a", ".gif"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", ".webp"), (b"II*\x00\xff\xff\xff\xff", ".tif"), (png_bomb(0, 10), ".png"),
])
def test_truncated_or_zero_sized_headers_are_refused(data: bytes, ext: str) -> None:
    with pytest.raises(ImageSizeError, match="truncated or corrupt"):
        image_size(data, ext)
