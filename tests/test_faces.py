"""tasks.faces and tasks.sample_photos with the real MTCNN weights on real photos."""

from __future__ import annotations

import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from tasks.faces import (
    CropResult,
    ImageDecodeError,
    MIN_FACE_PROBABILITY,
    crop_images,
    detect_faces,
    load_face_detector,
    load_rgb,
    square_around,
)
from tasks.sample_photos import sample_photo_count, write_sample_photos

SIZE = 256

# EXIF orientation -> the transpose that turns the displayed image into the stored pixels
# (the inverse of what a viewer applies).
STORE_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.fixture(scope="module")
def detector():  # noqa: ANN201 - facenet_pytorch.MTCNN
    return load_face_detector()


def confident_faces(image: Image.Image, detector) -> np.ndarray:  # noqa: ANN001
    boxes, probs = detector.detect(image)
    if boxes is None:
        return np.zeros((0, 4))
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    return boxes[np.asarray(probs, dtype=float) >= MIN_FACE_PROBABILITY]


def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def camera() -> Image.Image:
    return Image.fromarray(data.camera()).convert("RGB")


def save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def small(path: Path, side: int = 64) -> np.ndarray:
    image = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def dhash(image: Image.Image) -> np.ndarray:
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=float)
    return (grey[:, 1:] > grey[:, :-1]).ravel()


def write_png_bomb(path: Path, side: int) -> Path:
    """A valid 1-bit greyscale PNG of side x side zeros, built without holding its pixels."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    rows_per_block = 1000
    block = (b"\0" * (1 + (side + 7) // 8)) * rows_per_block
    compressor = zlib.compressobj(1)
    parts = [compressor.compress(block) for _ in range(side // rows_per_block)]
    idat = b"".join(parts) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


# --- crops around faces -------------------------------------------------------------------


def test_person_crop_is_centred_on_the_face(tmp_path: Path, detector) -> None:  # noqa: ANN001
    source = save(astronaut(), tmp_path / "astronaut.png")
    [result] = crop_images([source], tmp_path / "out", size=SIZE, mode="person", detector=detector)
    assert result.kept and result.face_found and result.reason is None
    assert result.path == tmp_path / "out" / "00.png"
    crop = Image.open(result.path)
    assert crop.size == (SIZE, SIZE)
    left, top, right, bottom = result.box
    assert right - left == bottom - top
    assert 0 <= left and 0 <= top and right <= 512 and bottom <= 512
    [face] = confident_faces(crop, detector)
    centre = np.array([(face[0] + face[2]) / 2, (face[1] + face[3]) / 2])
    assert np.all(np.abs(centre - SIZE / 2) < 0.15 * SIZE)
    assert (face[2] - face[0]) > 0.4 * SIZE  # the face fills the crop, not a distant speck


def test_exif_orientation_gives_the_same_crop(tmp_path: Path, detector) -> None:  # noqa: ANN001
    displayed = astronaut().crop((0, 0, 512, 384))  # not square, so 5-8 swap width and height
    paths = [save(displayed, tmp_path / "o1.jpg", quality=95)]
    for orientation, transpose in STORE_AS.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = displayed.transpose(transpose)
        paths.append(save(stored, tmp_path / f"o{orientation}.jpg", quality=95, exif=exif))
    results = crop_images(paths, tmp_path / "out", size=SIZE, mode="person", detector=detector)
    assert all(r.kept for r in results)
    # JPEG re-encoding of the transposed pixels moves the detected box by a pixel or so, so the
    # crops are compared by box and by their content at a scale where one pixel does not matter.
    reference = results[0]
    for result in results[1:]:
        assert np.abs(np.subtract(result.box, reference.box)).max() <= 3, result.source.name
        diff = np.abs(small(result.path) - small(reference.path)).mean()
        assert diff < 10, (result.source.name, diff)  # a 2 px shift gives about 8


def test_couple_crop_keeps_both_faces(tmp_path: Path, detector) -> None:  # noqa: ANN001
    canvas = Image.new("RGB", (640, 480), (128, 128, 128))
    canvas.paste(astronaut().crop((124, 20, 324, 220)), (100, 140))
    canvas.paste(camera().crop((127, 55, 327, 255)), (330, 140))
    source = save(canvas, tmp_path / "two.png")
    [couple] = crop_images([source], tmp_path / "c", size=SIZE, mode="couple", detector=detector)
    assert couple.kept and couple.face_found
    assert len(confident_faces(Image.open(couple.path), detector)) == 2
    [person] = crop_images([source], tmp_path / "p", size=SIZE, mode="person", detector=detector)
    assert len(confident_faces(Image.open(person.path), detector)) == 1


def test_images_without_faces(tmp_path: Path, detector) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    noise_pixels = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    noise = save(Image.fromarray(noise_pixels), tmp_path / "n.png")
    grey = save(Image.new("RGB", (400, 300), (128, 128, 128)), tmp_path / "g.png")
    person = crop_images([noise, grey], tmp_path / "p", size=SIZE, mode="person", detector=detector)
    assert [(r.kept, r.face_found, r.reason, r.path) for r in person] == [
        (False, False, "no face found", None)
    ] * 2
    assert list((tmp_path / "p").iterdir()) == []
    objects = crop_images([noise, grey], tmp_path / "o", size=SIZE, mode="object")
    assert [(r.kept, r.box) for r in objects] == [(True, (50, 0, 350, 300))] * 2
    assert all(Image.open(r.path).size == (SIZE, SIZE) for r in objects)
    lenient = crop_images(
        [noise], tmp_path / "l", size=SIZE, mode="person", require_face=False, detector=detector
    )
    [kept] = lenient
    assert (kept.kept, kept.face_found, kept.box) == (True, False, (50, 0, 350, 300))


def test_object_mode_needs_no_detector(tmp_path: Path) -> None:
    source = save(Image.new("RGB", (100, 64), (10, 200, 10)), tmp_path / "a.png")
    [result] = crop_images([source], tmp_path / "o", size=32, mode="object")
    assert result.kept and result.box == (18, 0, 82, 64)
    assert Image.open(result.path).getpixel((16, 16)) == (10, 200, 10)


# --- geometry -----------------------------------------------------------------------------


def test_square_is_moved_inside_the_image() -> None:
    # face near the top-left corner: the square keeps its size and shifts inside
    assert square_around((0, 0, 50, 50), (400, 300), 0.6) == (0, 0, 80, 80)
    # face near the bottom-right corner
    assert square_around((350, 250, 400, 300), (400, 300), 0.6) == (320, 220, 400, 300)
    # wanted square (160) larger than the image height (100): the largest that fits, on the face
    assert square_around((200, 0, 300, 100), (400, 100), 0.6) == (200, 0, 300, 100)


# --- decoding -----------------------------------------------------------------------------


def test_png_bomb_is_refused_from_the_header(tmp_path: Path, detector) -> None:  # noqa: ANN001
    bomb = write_png_bomb(tmp_path / "bomb.png", 60000)
    assert bomb.stat().st_size < 2_000_000
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.monotonic()
    with pytest.raises(ImageDecodeError, match="too large: 60000x60000 pixels"):
        load_rgb(bomb, max_pixels=40_000_000)
    [result] = crop_images([bomb], tmp_path / "out", size=SIZE, mode="person", detector=detector)
    assert time.monotonic() - start < 2
    assert not result.kept and "too large: 60000x60000 pixels" in result.reason
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 100


def test_over_max_pixels_but_under_pillows_limit(tmp_path: Path) -> None:
    path = save(Image.new("L", (2000, 1000)), tmp_path / "wide.png")
    with pytest.raises(ImageDecodeError, match="too large: 2000x1000 pixels"):
        load_rgb(path, max_pixels=1_000_000)


def test_modes_become_rgb(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    palette.putpixel((0, 0), 1)
    la = Image.new("LA", (4, 4), (0, 0))  # fully transparent black
    sixteen = Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16))
    cases = {
        save(palette, tmp_path / "p.png", transparency=1): [(255, 255, 255), (255, 0, 0)],
        save(la, tmp_path / "la.png"): [(255, 255, 255)] * 2,
        save(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), tmp_path / "c.jpg"): [(255, 0, 0)] * 2,
        save(sixteen, tmp_path / "16.png"): [(127, 127, 127)] * 2,
    }
    for path, (first, second) in cases.items():
        image = load_rgb(path, max_pixels=100)
        assert image.mode == "RGB" and image.size == (4, 4), path.name
        assert np.allclose(image.getpixel((0, 0)), first, atol=3), path.name
        assert np.allclose(image.getpixel((1, 1)), second, atol=3), path.name


def test_first_frame_of_an_animation(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert load_rgb(path, max_pixels=1000).getpixel((4, 4)) == (255, 0, 0)


def test_broken_files_are_dropped_not_raised(tmp_path: Path, detector) -> None:  # noqa: ANN001
    text = tmp_path / "notes.png"
    text.write_text("hello")
    truncated = tmp_path / "cut.jpg"
    save(astronaut(), truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    good = save(astronaut(), tmp_path / "good.png")
    paths = [text, truncated, good]
    results = crop_images(paths, tmp_path / "o", size=64, mode="person", detector=detector)
    assert [r.kept for r in results] == [False, False, True]
    assert results[0].reason == "not a recognised image format"
    assert results[1].reason.startswith("could not decode")
    assert results[2].path == tmp_path / "o" / "02.png"


def test_too_small_images_are_dropped_and_the_rest_still_crop(tmp_path: Path, detector) -> None:  # noqa: ANN001
    # An 8x8 image once crashed the whole batch inside MTCNN (its image pyramid was empty).
    tiny = save(astronaut().resize((8, 8)), tmp_path / "tiny.png")
    sliver = save(astronaut().resize((3000, 40)), tmp_path / "sliver.png")
    smallest = save(astronaut().resize((64, 64)), tmp_path / "smallest.png")
    good = save(astronaut(), tmp_path / "good.png")
    for mode in ("person", "object"):
        results = crop_images([tiny, sliver, smallest, good], tmp_path / mode, size=64, mode=mode,
                              require_face=False, detector=detector)
        assert [r.kept for r in results] == [False, False, True, True], mode
        assert results[0].reason == "too small: 8x8 pixels (at least 64 on the shorter side)"
        assert results[1].reason == "too small: 3000x40 pixels (at least 64 on the shorter side)"
        assert results[3].face_found is (mode == "person")


def test_detection_copies_narrower_than_a_face_have_none(detector) -> None:  # noqa: ANN001
    # 64 x 3000 is shrunk to 17 x 800 for detection; both are below MTCNN's 20-pixel smallest face.
    images = [astronaut().resize((64, 3000)), astronaut().resize((8, 8)), astronaut()]
    found = detect_faces(images, detector)
    assert [len(boxes) for boxes in found[:2]] == [0, 0]
    assert len(found[2]) == 1


# --- sample photos ------------------------------------------------------------------------


def test_sample_photos_have_faces_and_differ(tmp_path: Path, detector) -> None:  # noqa: ANN001
    paths = write_sample_photos(tmp_path / "samples", count=sample_photo_count())
    assert len(paths) == sample_photo_count() >= 5
    images = [Image.open(path).convert("RGB") for path in paths]
    for path, image in zip(paths, images, strict=True):
        assert len(confident_faces(image, detector)) >= 1, path.name
    hashes = [dhash(image) for image in images]
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            assert (hashes[i] != hashes[j]).sum() > 16, (paths[i].name, paths[j].name)
    start = time.monotonic()
    results: list[CropResult] = crop_images(
        paths[:5], tmp_path / "crops", size=SIZE, mode="person", detector=detector
    )
    elapsed = time.monotonic() - start
    assert all(r.kept and r.face_found for r in results)
    print(f"cropped 5 sample photos in {elapsed:.2f} s")
    assert elapsed < 20
