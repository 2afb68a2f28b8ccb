"""Real face photos that ship with scikit-image, for the offline demo and end-to-end tests.

Each has a face MTCNN finds with high probability, and no two are near-duplicates
(tests/test_faces.py checks both).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

LFW_SIZE = 160  # lfw_subset faces are 25 x 25; upscaled so they are usable crops
# Indices into skimage.data.lfw_subset() (the first 100 are faces), picked to differ the most
# from each other by difference hash.
_LFW_INDICES = (4, 28, 2, 11)


def _astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def _camera() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.camera()).convert("RGB")


def _lfw_face(index: int) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from skimage import data

        grey = np.round(data.lfw_subset()[index] * 255).astype(np.uint8)
        face = Image.fromarray(grey).convert("RGB")
        return face.resize((LFW_SIZE, LFW_SIZE), Image.Resampling.LANCZOS)

    return load


def _sources() -> list[tuple[str, Callable[[], Image.Image]]]:
    named = [("astronaut", _astronaut), ("camera", _camera)]
    return named + [(f"lfw{index:03d}", _lfw_face(index)) for index in _LFW_INDICES]


def sample_photo_count() -> int:
    """How many sample photos there are."""
    return len(_sources())


def write_sample_photos(dest_dir: Path, count: int = 5) -> list[Path]:
    """Write ``count`` face photos as PNG into ``dest_dir`` (NN_<name>.png) and return them."""
    sources = _sources()
    if not 1 <= count <= len(sources):
        raise ValueError(f"count must be between 1 and {len(sources)}, got {count}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (name, load) in enumerate(sources[:count]):
        path = dest_dir / f"{index:02d}_{name}.png"
        load().save(path, format="PNG")
        paths.append(path)
    return paths
