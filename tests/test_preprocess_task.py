"""The crop-faces task body on real photos with the real MTCNN and a local store: duplicates,
faceless and broken images are dropped, reported in the store, the stage log and a contact sheet.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.params import TrainingParams
from flows.records import read_stage
from tasks.context import worker_settings, worker_store
from tasks.crop_report import COLUMNS, LABEL_HEIGHT, THUMB_SIDE
from tasks.artifacts import artifact_key, publish_artifacts
from tasks.preprocess import TooFewImages, crop_faces
from tasks.sample_photos import write_sample_photos

TRAINING_ID = "crop-test-1"


@pytest.fixture
def worker_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Worker settings on a fresh data folder with local storage."""
    monkeypatch.setenv("DREAMFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DREAMFLOW_STORAGE", "local")
    worker_settings.cache_clear()
    worker_store.cache_clear()
    yield tmp_path
    worker_settings.cache_clear()
    worker_store.cache_clear()


def inputs(folder: Path) -> list[Path]:
    """Four distinct face photos, a re-encoded copy of the first, noise and a text file."""
    photos = write_sample_photos(folder / "photos", count=4)
    copy = folder / "copy.jpg"
    Image.open(photos[0]).save(copy, quality=60)
    noise = folder / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(noise)
    text = folder / "notes.png"
    text.write_text("not an image")
    return [*photos, copy, noise, text]


def params() -> TrainingParams:
    return TrainingParams(
        training_id=TRAINING_ID, instance_prompt="photo of sks person", images=["x"], training_type="female"
    )


def test_crop_task_drops_and_reports(worker_env: Path) -> None:
    paths = inputs(worker_env)
    kept = crop_faces.fn(params(), [str(p) for p in paths])
    assert [Path(p).name for p in kept] == ["00.png", "01.png", "02.png", "03.png"]
    assert not (Path(kept[0]).parent / "04.png").exists()  # the duplicate's crop is removed
    store = worker_store()
    prefix = f"trainings/{TRAINING_ID}/"
    assert store.list(f"{prefix}crops/") == [f"{prefix}crops/{Path(p).name}" for p in kept]

    rows = json.loads(store.get_bytes(f"{prefix}report/crops.json"))
    assert [(r["source"], r["kept"]) for r in rows] == [(p.name, i < 4) for i, p in enumerate(paths)]
    reasons = {r["source"]: r["reason"] for r in rows if not r["kept"]}
    assert reasons["copy.jpg"].startswith("near-duplicate of 00_astronaut.png")
    assert reasons == {
        "copy.jpg": reasons["copy.jpg"], "noise.png": "no face found", "notes.png": "not a recognised image format"
    }

    with Image.open(worker_env / "data" / "storage" / prefix / "report" / "contact_sheet.png") as sheet:
        assert sheet.size == (5 * THUMB_SIDE, THUMB_SIDE + LABEL_HEIGHT)  # 4 kept + the duplicate
        assert 5 <= COLUMNS

    log = read_stage(store, TRAINING_ID).log
    summary = next(line for line in log if line.startswith("kept "))
    assert summary.startswith("kept 4 of 7 images; dropped copy.jpg: near-duplicate of 00_astronaut.png")
    assert "noise.png: no face found" in summary and "notes.png: not a recognised image format" in summary


def test_too_few_images_fail_with_the_reasons(worker_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMFLOW_MIN_IMAGES", "5")
    paths = inputs(worker_env)
    with pytest.raises(TooFewImages, match=r"only 4 usable image\(s\), at least 5 needed \(kept 4 of 7"):
        crop_faces.fn(params(), [str(p) for p in paths])
    assert worker_store().exists(f"trainings/{TRAINING_ID}/report/contact_sheet.png")


def test_artifacts_are_skipped_outside_a_prefect_run() -> None:
    publish_artifacts(TRAINING_ID, "crop-report", "# report", "crops", {"contact-sheet": "http://127.0.0.1/sheet.png"})
    assert artifact_key("Abc_12.x", "crop-report") == "crop-report-abc-12-x"
