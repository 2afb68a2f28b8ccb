"""The crop behind ``base64_crop``: one uploaded image to a square PNG, face-centred when there is a face.

Runs in the facade's crop process (see api/cropper.py), never in the facade itself.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

from flows.imagebytes import sniff_image_extension


class CropFailed(ValueError):
    """The upload could not be decoded as an image."""


@lru_cache(maxsize=1)
def _detector():  # noqa: ANN202 - facenet's MTCNN, loaded once per crop process
    from tasks.faces import load_face_detector

    return load_face_detector()


def crop_upload(data: bytes, size: int, max_pixels: int) -> bytes:
    """PNG bytes of a ``size``-pixel square: around the largest face, or the centre without one."""
    from tasks.faces import crop_images

    ext = sniff_image_extension(data[:16]) or ".img"
    with tempfile.TemporaryDirectory(prefix="dreamflow-crop-") as tmp:
        source = Path(tmp) / f"upload{ext}"
        source.write_bytes(data)
        (result,) = crop_images([source], Path(tmp) / "out", size=size, mode="person", require_face=False,
                                max_pixels=max_pixels, detector=_detector())
        if not result.kept or result.path is None:
            raise CropFailed(result.reason or "the image could not be decoded")
        return result.path.read_bytes()


def warm_up() -> bool:
    """Load torch and the face detector so the first real crop is fast."""
    _detector()
    return True
