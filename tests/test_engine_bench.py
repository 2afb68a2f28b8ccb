"""The GPU benchmark script's code path, in its CPU smoke mode (no GPU here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_train_bench.py"


def test_cpu_smoke_mode_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "gpu_train.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "2", "--warmup", "1", "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                                          "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["tiny"] is True
    variants = [(v["compile"], v["gradient_checkpointing"]) for v in report["variants"]]
    assert variants == [(False, False), (False, True)]
    assert all(v["ms_per_step"] > 0 and v["trainable_params"] > 0 for v in report["variants"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_it_exits_2_with_a_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not (tmp_path / "x.json").exists()
