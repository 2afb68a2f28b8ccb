"""The GPU benchmark script's code path, in its CPU smoke mode (no GPU here), run in-process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from engine_fixtures import one_torch_thread  # noqa: F401

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_train_bench.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_train_bench", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_mode_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "gpu_train.json"
    args = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--tiny", "--job-steps", "8", "--job-images", "2"]
    assert load_bench().main([*args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["tiny"] is True
    variants = [(v["loop"], v["variant"], v["gradient_checkpointing"]) for v in report["step_variants"]]
    assert variants == [("bare", "eager", True), ("bare", "eager", False), ("engine", "eager", False)]
    assert all(v["ms_per_step"] > 0 for v in report["step_variants"])
    (job,) = report["jobs"]  # a whole train() run of the SD-1.5-shaped pipeline builder, tiny sizes
    assert job["steps"] == 8 and job["loop_steps_per_s"] > 0 and job["adapter_bytes"] > 0


def test_sd15_config_and_peak_lookup() -> None:
    bench = load_bench()
    assert bench.SD15_UNET["block_out_channels"] == [320, 640, 1280, 1280]
    assert bench.SD15_UNET["cross_attention_dim"] == 768
    assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and bench.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_it_exits_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_bench().main(["--out", str(tmp_path / "x.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
