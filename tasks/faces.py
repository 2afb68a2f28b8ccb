"""Decode training images safely and crop them square around the face (or the centre).

Plain module: no Prefect import. Decoding checks the pixel count from the header before any
pixel is decoded, applies EXIF orientation and flattens every mode to RGB. Faces are found with
facenet-pytorch's MTCNN (weights ship inside the package), run in batches on downscaled copies.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flows.imagebytes import too_small

if TYPE_CHECKING:
    from facenet_pytorch import MTCNN

CropMode = Literal["person", "couple", "object"]
Box = tuple[int, int, int, int]  # left, top, right, bottom in source pixels

MIN_FACE_PROBABILITY = 0.9
DETECT_MAX_SIDE = 800  # detection runs on copies no larger than this; boxes are scaled back
CHUNK_SIZE = 8  # images decoded, held and detected at once (one detection batch)

_DECODE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError
)


class ImageDecodeError(Exception):
    """An image file could not be decoded (or was refused before decoding)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class CropResult:
    """What happened to one source image."""

    source: Path
    path: Path | None  # the saved crop, None when dropped
    kept: bool
    face_found: bool
    reason: str | None  # why it was dropped
    box: Box | None  # the square crop box in source pixels


def _header_size(path: Path) -> tuple[int, int] | None:
    """The image size from the header alone, bypassing Pillow's decompression-bomb refusal.

    Used only to name the size in the error message; walks Pillow's registered format openers
    the way ``Image.open`` does, none of which decode pixels.
    """
    Image.init()
    with open(path, "rb") as fp:
        prefix = fp.read(16)
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            verdict = accept(prefix) if accept is not None else True
            if isinstance(verdict, str) or not verdict:
                continue
            fp.seek(0)
            try:
                return factory(fp, str(path)).size
            except (SyntaxError, IndexError, TypeError, ValueError, OSError, struct.error):
                continue
    return None


def _too_large(path: Path, size: tuple[int, int] | None, max_pixels: int) -> ImageDecodeError:
    shown = f"{size[0]}x{size[1]}" if size else "over the limit of"
    return ImageDecodeError(path, f"image too large: {shown} pixels (limit {max_pixels:,})")


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily and refuse images over ``max_pixels`` before decoding anything."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError:
        raise _too_large(path, _header_size(path), max_pixels) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not a recognised image format") from None
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(path, f"could not read ({exc})") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise _too_large(path, (width, height), max_pixels)
    if width < 1 or height < 1:
        image.close()
        raise ImageDecodeError(path, f"empty image ({width}x{height})")
    return image


def _to_8bit_luminance(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale to 8-bit, scaled (Pillow's convert would clip at 255)."""
    values = np.asarray(image, dtype=np.float64)
    scale = 257.0 if values.max(initial=0) > 255 else 1.0
    return Image.fromarray(np.clip(values / scale, 0, 255).round().astype(np.uint8), "L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is flattened onto white."""
    if image.mode.startswith(("I", "F")):
        image = _to_8bit_luminance(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: Path, max_pixels: int) -> Image.Image:
    """Decode the first frame of ``path`` as upright RGB; raise :class:`ImageDecodeError`.

    The pixel count is checked from the header before decoding, so a decompression bomb is
    refused without allocating its pixels.
    """
    image = _open_checked(Path(path), max_pixels)
    try:
        with image:
            image.seek(0)
            upright = ImageOps.exif_transpose(image)
            return _to_rgb(upright)
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(path, f"could not decode ({exc})") from exc


def load_face_detector(device: str = "cpu") -> MTCNN:
    """MTCNN that returns every face; its weights ship inside facenet-pytorch."""
    from facenet_pytorch import MTCNN

    return MTCNN(keep_all=True, post_process=False, device=device)


def _detection_copy(image: Image.Image) -> tuple[Image.Image, float]:
    """A copy no larger than DETECT_MAX_SIDE, and the factor from its pixels to the source's."""
    longest = max(image.size)
    if longest <= DETECT_MAX_SIDE:
        return image, 1.0
    scale = DETECT_MAX_SIDE / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    copy = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return copy, longest / DETECT_MAX_SIDE


def detect_faces(images: Sequence[Image.Image], detector: MTCNN) -> list[np.ndarray]:
    """Face boxes (N x 4 float, x1 y1 x2 y2 in source pixels) with probability >= 0.9.

    Images are downscaled for detection and batched by detection size; one whose detection copy is
    narrower than the detector's smallest face has none.
    """
    copies = [_detection_copy(image) for image in images]
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (copy, _) in enumerate(copies):
        groups[copy.size].append(index)
    found: list[np.ndarray] = [np.zeros((0, 4))] * len(images)
    for size, indices in groups.items():
        if min(size) < detector.min_face_size:  # no face fits (and MTCNN's image pyramid would be empty)
            continue
        batch_boxes, batch_probs = detector.detect([copies[i][0] for i in indices])
        for index, boxes, probs in zip(indices, batch_boxes, batch_probs, strict=True):
            found[index] = _confident_boxes(boxes, probs) * copies[index][1]
    return found


def _confident_boxes(boxes: object, probs: object) -> np.ndarray:
    if boxes is None:
        return np.zeros((0, 4))
    boxes_arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    probs_arr = np.asarray(probs, dtype=np.float64).reshape(-1)
    return boxes_arr[probs_arr >= MIN_FACE_PROBABILITY]


def _largest(boxes: np.ndarray, count: int) -> np.ndarray:
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-areas, kind="stable")
    return boxes[order[:count]]


def square_around(face: Sequence[float], image_size: tuple[int, int], margin: float) -> Box:
    """A square of side max(w, h) * (1 + margin) centred on ``face``, moved to fit the image.

    When that square is larger than the image allows, the largest square that fits is used,
    still placed as close to centred on the face as the image allows.
    """
    width, height = image_size
    x1, y1, x2, y2 = face
    wanted = max(x2 - x1, y2 - y1) * (1 + margin)
    side = max(1, min(round(wanted), width, height))
    left = round((x1 + x2) / 2 - side / 2)
    top = round((y1 + y2) / 2 - side / 2)
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return (left, top, left + side, top + side)


def centre_square(image_size: tuple[int, int]) -> Box:
    """The largest centred square."""
    width, height = image_size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def choose_box(
    faces: np.ndarray, image_size: tuple[int, int], mode: CropMode, margin: float
) -> Box | None:
    """The crop box for one image, or None when a face was needed and there is none."""
    if mode == "object":
        return centre_square(image_size)
    if len(faces) == 0:
        return None
    chosen = _largest(faces, 2 if mode == "couple" else 1)
    union = (chosen[:, 0].min(), chosen[:, 1].min(), chosen[:, 2].max(), chosen[:, 3].max())
    return square_around(union, image_size, margin)


def _crop_one(
    image: Image.Image,
    faces: np.ndarray,
    source: Path,
    dest: Path,
    size: int,
    mode: CropMode,
    margin: float,
    require_face: bool,
) -> CropResult:
    face_found = len(faces) > 0
    box = choose_box(faces, image.size, mode, margin)
    if box is None:
        if require_face:
            return CropResult(source, None, False, False, "no face found", None)
        box = centre_square(image.size)
    crop = image.resize((size, size), Image.Resampling.LANCZOS, box=box)
    crop.save(dest, format="PNG")
    return CropResult(source, dest, True, face_found and mode != "object", None, box)


def crop_images(
    paths: Sequence[Path],
    out_dir: Path,
    *,
    size: int,
    mode: CropMode,
    margin: float = 0.6,
    require_face: bool = True,
    max_pixels: int = 40_000_000,
    detector: MTCNN | None = None,
    batch_size: int = CHUNK_SIZE,
) -> list[CropResult]:
    """Decode, crop square and resize each image to ``size`` x ``size``, saved as NN.png.

    "person" crops around the largest face, "couple" around the two largest, "object" the
    centre. Images that cannot be decoded, are too small (``flows.imagebytes.too_small``), or (with
    ``require_face``) have no face in person or couple mode, are dropped with a reason; nothing is
    raised for a single bad image.
    Images are decoded and detected ``batch_size`` at a time. Results are in the order of
    ``paths``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode != "object" and detector is None:
        detector = load_face_detector()
    width = max(2, len(str(max(len(paths) - 1, 0))))
    results: dict[int, CropResult] = {}
    for start in range(0, len(paths), batch_size):
        chunk = list(enumerate(paths[start : start + batch_size], start))
        decoded: list[tuple[int, Path, Image.Image]] = []
        for index, path in chunk:
            try:
                image = load_rgb(Path(path), max_pixels)
            except ImageDecodeError as exc:
                results[index] = CropResult(Path(path), None, False, False, exc.reason, None)
                continue
            if problem := too_small(*image.size):
                results[index] = CropResult(Path(path), None, False, False, problem, None)
            else:
                decoded.append((index, Path(path), image))
        images = [image for _, _, image in decoded]
        wants_faces = detector is not None and mode != "object"
        faces = detect_faces(images, detector) if wants_faces else None
        for position, (index, source, image) in enumerate(decoded):
            found = faces[position] if faces is not None else np.zeros((0, 4))
            dest = out_dir / f"{index:0{width}d}.png"
            results[index] = _crop_one(image, found, source, dest, size, mode, margin, require_face)
    return [results[index] for index in range(len(paths))]
