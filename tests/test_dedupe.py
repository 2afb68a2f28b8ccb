"""tasks.dedupe on real photos: re-encoded, resized and brightened copies are one image."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageEnhance
from skimage import data

from tasks.dedupe import DEFAULT_MAX_DISTANCE, drop_near_duplicates, hamming, hash_file
from tasks.sample_photos import sample_photo_count, write_sample_photos


def near_duplicates(folder: Path) -> list[Path]:
    """The same photo as PNG, as a low-quality JPEG, slightly smaller, and slightly brighter."""
    photo = Image.fromarray(data.astronaut())
    folder.mkdir()
    photo.save(folder / "original.png")
    photo.save(folder / "q55.jpg", quality=55)
    photo.resize((470, 470), Image.Resampling.LANCZOS).save(folder / "smaller.png")
    ImageEnhance.Brightness(photo).enhance(1.12).save(folder / "brighter.jpg", quality=90)
    return [folder / name for name in ("original.png", "q55.jpg", "smaller.png", "brighter.jpg")]


def test_a_near_duplicate_set_is_reduced_to_its_first_image(tmp_path: Path) -> None:
    paths = near_duplicates(tmp_path / "dups")
    kept, dropped = drop_near_duplicates(paths)
    assert kept == [paths[0]]
    assert [d.path for d in dropped] == paths[1:]
    for duplicate in dropped:
        assert duplicate.duplicate_of == paths[0]
        assert duplicate.distance <= DEFAULT_MAX_DISTANCE
        assert duplicate.reason.startswith("near-duplicate of original.png")


def test_distinct_sample_photos_are_all_kept(tmp_path: Path) -> None:
    photos = write_sample_photos(tmp_path / "samples", count=sample_photo_count())
    kept, dropped = drop_near_duplicates(photos)
    assert (kept, dropped) == (photos, [])
    hashes = [hash_file(p) for p in photos]
    closest = min(hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :])
    assert closest > 3 * DEFAULT_MAX_DISTANCE  # a wide margin, not a lucky threshold


def test_duplicates_among_distinct_photos_keep_order(tmp_path: Path) -> None:
    photos = write_sample_photos(tmp_path / "samples", count=3)
    copy = tmp_path / "copy.jpg"
    Image.open(photos[1]).save(copy, quality=70)
    kept, dropped = drop_near_duplicates([photos[0], photos[1], copy, photos[2]])
    assert kept == photos
    assert [(d.path, d.duplicate_of) for d in dropped] == [(copy, photos[1])]
