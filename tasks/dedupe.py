"""Near-duplicate images by perceptual hash (64-bit difference hash).

Plain module: no Prefect import. The hash compares the brightness of neighbouring cells of a
9 x 8 greyscale thumbnail, so it survives re-encoding, resizing and brightness changes, while
different photos (or different crops of one photo) differ in many bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HASH_SIDE = 8  # 8 x 8 = 64 bits
DEFAULT_MAX_DISTANCE = 6  # bits; near-duplicates measure 0-4, distinct sample crops 20+


@dataclass(frozen=True)
class Duplicate:
    """An image dropped because it is a near-duplicate of an earlier one."""

    path: Path
    duplicate_of: Path
    distance: int

    @property
    def reason(self) -> str:
        """Why it was dropped, naming the image it duplicates."""
        return f"near-duplicate of {self.duplicate_of.name} (hash distance {self.distance})"


def dhash(image: Image.Image) -> int:
    """The 64-bit difference hash of ``image`` (bit set where a cell is brighter than its left)."""
    grey = image.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.BOX)
    cells = np.asarray(grey, dtype=np.int16)
    bits = (cells[:, 1:] > cells[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hash_file(path: Path) -> int:
    """The difference hash of the image at ``path``."""
    with Image.open(path) as image:
        image.draft("L", (64, 64))  # JPEGs decode at a reduced scale; a no-op for other formats
        return dhash(image)


def hamming(first: int, second: int) -> int:
    """The number of bits in which two hashes differ."""
    return (first ^ second).bit_count()


def drop_near_duplicates(
    paths: Sequence[Path], max_distance: int = DEFAULT_MAX_DISTANCE
) -> tuple[list[Path], list[Duplicate]]:
    """Keep the first image of each group of near-duplicates; return (kept, dropped).

    An image is a near-duplicate when its hash is within ``max_distance`` bits of a kept
    image's hash; it is reported against the closest kept image. Order is preserved.
    """
    kept: list[tuple[Path, int]] = []
    dropped: list[Duplicate] = []
    for path in map(Path, paths):
        value = hash_file(path)
        matches = [(hamming(value, other), kept_path) for kept_path, other in kept]
        closest = min(matches, key=lambda match: match[0], default=None)
        if closest is not None and closest[0] <= max_distance:
            dropped.append(Duplicate(path, closest[1], closest[0]))
        else:
            kept.append((path, value))
    return [path for path, _ in kept], dropped
