"""Benchmark: face-crop 10 photos of 1024 x 1024, batched detection against one at a time.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_face_crop.py [--repeats 3]``.
Writes ``bench/results/face_crop.json`` and prints it. Two levels are timed with one MTCNN:

- ``crop_images``: the whole stage (decode PNG, detect, crop, resize, save) with
  ``batch_size=1`` (one image per detection call) against ``batch_size=8`` (the default) and 10;
- ``detect_faces``: detection alone on decoded images, one call per image against one call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.faces import CHUNK_SIZE, crop_images, detect_faces, load_face_detector, load_rgb  # noqa: E402
from tasks.sample_photos import sample_photo_count, write_sample_photos  # noqa: E402

SIDE = 1024
COUNT = 10
CROP_SIZE = 512
RESULTS = Path(__file__).resolve().parent / "results"


def build_photos(folder: Path) -> list[Path]:
    """10 RGB photos of 1024 x 1024, each holding one real face (skimage photos, upscaled/composed).

    astronaut and camera whole, mirrored and zoomed on the face; four LFW faces (25 px originals,
    upscaled) on a grey background, at a size where MTCNN finds each of them.
    """
    sources = [Image.open(p).convert("RGB") for p in write_sample_photos(folder / "src", sample_photo_count())]
    astronaut, camera, faces = sources[0], sources[1], sources[2:6]
    variants = [astronaut, camera, ImageOps.mirror(astronaut), ImageOps.mirror(camera),
                astronaut.crop((64, 0, 448, 384)), camera.crop((96, 0, 448, 352))]
    photos = [v.resize((SIDE, SIDE), Image.Resampling.LANCZOS) for v in variants]
    for face in faces:
        photo = Image.new("RGB", (SIDE, SIDE), (128, 128, 128))
        photo.paste(face.resize((480, 480), Image.Resampling.LANCZOS), (200, 200))
        photos.append(photo)
    paths = []
    for index, photo in enumerate(photos[:COUNT]):
        path = folder / f"{index:02d}.png"
        photo.save(path)
        paths.append(path)
    return paths


def timed(run: Callable[[], object], repeats: int) -> dict[str, float | list[float]]:
    """Seconds of ``repeats`` runs after one warm-up run."""
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return {"mean_s": statistics.mean(seconds), "min_s": min(seconds), "runs_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    work = RESULTS / "tmp" / "face_crop"
    shutil.rmtree(work, ignore_errors=True)
    photos = build_photos(work)
    detector = load_face_detector()

    def crop(batch_size: int) -> Callable[[], object]:
        def run() -> object:
            results = crop_images(photos, work / f"out{batch_size}", size=CROP_SIZE, mode="person",
                                  detector=detector, batch_size=batch_size)
            if not all(r.kept and r.face_found for r in results):
                raise RuntimeError(f"a benchmark photo lost its face: {results}")
            return results
        return run

    images = [load_rgb(p, 40_000_000) for p in photos]
    crop_modes = {"one_at_a_time": 1, f"batched_{CHUNK_SIZE}": CHUNK_SIZE, f"batched_{COUNT}": COUNT}
    crop_times = {name: timed(crop(size), args.repeats) for name, size in crop_modes.items()}
    detect_times = {
        "one_at_a_time": timed(lambda: [detect_faces([image], detector) for image in images], args.repeats),
        "batched": timed(lambda: detect_faces(images, detector), args.repeats),
    }
    report = {
        "photos": COUNT, "photo_side": SIDE, "crop_size": CROP_SIZE, "repeats": args.repeats,
        "crop_images": crop_times,
        "crop_images_speedup": {name: crop_times["one_at_a_time"]["mean_s"] / t["mean_s"]
                                for name, t in crop_times.items()},
        "detect_faces": detect_times,
        "detect_faces_speedup": detect_times["one_at_a_time"]["mean_s"] / detect_times["batched"]["mean_s"],
        "machine": {
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": "cpu", "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0],
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "face_crop.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
