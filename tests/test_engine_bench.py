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
    args = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--tiny", "--job-steps", "8", "--job-images", "2",
            "--parts", "step,job,extra"]
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


def test_cpu_smoke_of_the_graph_job_compares_runs_loss_by_loss(tmp_path: Path) -> None:
    """On CPU both runs are eager (CUDA graphs need a GPU), so the comparison must find them identical."""
    out = tmp_path / "gpu_train.json"
    args = ["--device", "cpu", "--tiny", "--parts", "graphjob", "--compare-steps", "6", "--job-steps", "6",
            "--job-images", "2"]
    assert load_bench().main([*args, "--out", str(out)]) == 0
    part = json.loads(out.read_text())["graph_job"]
    compare = part["compare"]
    assert len(compare["eager_losses"]) == len(compare["graph_losses"]) == 6
    assert compare["max_relative_loss_difference"] == 0 and compare["adapter_relative_difference"] == 0
    assert part["job"]["cuda_graphs"] is True and part["job"]["steps"] == 6 and part["job"]["adapter_bytes"] > 0


def test_step_variants_cpu_smoke_times_and_breaks_down_a_step(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gpu_step_variants", SCRIPT.with_name("gpu_step_variants.py"))
    assert spec and spec.loader
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    out = tmp_path / "variants.json"
    changes = '[{"channels_last": true, "precision": "bf16-base"}, {"precision": "bf16-master"}]'
    args = ["--device", "cpu", "--tiny", "--steps", "2", "--parts", "captured,profile", "--captured", changes]
    assert variants.main([*args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    base, master = report["captured"]
    assert base["precision"] == "bf16-base" and base["channels_last"] and base["eager_ms_per_step"] > 0
    assert master["precision"] == "bf16-master" and "error" not in master and master["eager_ms_per_step"] > 0
    (breakdown,) = report["kernel_breakdown"]
    assert breakdown["kernels"] > 100 and sum(breakdown["kernel_ms_by_kind"].values()) > 0
