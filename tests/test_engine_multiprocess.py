"""The engine with two processes (torchrun; accelerate's multi-CPU mode over gloo): the path a
multi-GPU job takes, minus the GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from tasks.sample_photos import write_sample_photos
from tasks.tiny_models import TINY_RESOLUTION, build_tiny_sd


def test_two_processes_train_one_job_and_the_main_process_saves_it(tmp_path: Path) -> None:
    tiny = build_tiny_sd(tmp_path / "tiny")
    photos = write_sample_photos(tmp_path / "photos", count=2)
    job = {
        "config": {"pretrained_path": str(tiny), "family": "sd15", "method": "lora", "resolution": TINY_RESOLUTION,
                   "max_train_steps": 4, "seed": 0, "learning_rate": 1e-3, "report_every": 2},
        "images": [str(p) for p in photos], "captions": ["photo of sks person"] * 2, "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "tasks.engine_cli", str(tmp_path / "job.json")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "true"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["processes"] == 2 and result["steps"] == 4
    with safe_open(result["adapter_file"], "pt") as weights:
        keys = list(weights.keys())
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
