"""The training-loop benchmark's two loops, 2 steps each on `tiny`, and its JSON, run in-process.

A smoke test of the code path only: no timing is asserted.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
from engine_fixtures import one_torch_thread  # noqa: F401

from tasks.tiny_models import build_tiny_sd

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        import bench_train_loop

        return bench_train_loop
    finally:
        sys.path.remove(str(BENCH))


def test_both_loops_train_two_steps_and_the_result_has_its_keys(bench: ModuleType, tmp_path: Path) -> None:
    tiny = build_tiny_sd(tmp_path / "tiny")
    images = bench.prepare_images(tmp_path / "images", count=3)
    engine = bench.run_engine(tiny, images, 2, tmp_path)
    reference = bench.run_reference(tiny, images, 2)
    for run in (engine, reference):
        assert len(run.step_ends) == 2 and len(run.losses) == 2
        assert all(math.isfinite(loss) for loss in run.losses), run.losses
        assert run.steps_per_second > 0

    body = bench.figures({"engine": [engine], "reference": [reference]}, steps=2, rounds=1)
    path = bench.write_result("train_loop", body, bench.load_average(), results_dir=tmp_path / "results")
    written = json.loads(path.read_text())
    assert path.name == "train_loop.json"
    assert set(written) == {"benchmark", "machine", "setup", "loops", "ratio_engine_over_reference",
                            "ratio_engine_compiled_over_reference", "target_ratio", "meets_target",
                            "meets_target_with_compile_unet"}
    assert written["ratio_engine_compiled_over_reference"] is None  # no compiled loop in this smoke run
    assert set(written["machine"]) == set(sys.modules["benchresults"].MACHINE_KEYS)
    assert written["machine"]["cpu_count"] >= 1 and written["machine"]["torch_threads"] == 1
    assert written["machine"]["shared_machine"] is True and len(written["machine"]["load_average_before"]) == 3
    assert set(written["loops"]) == {"engine", "reference"}
    assert written["loops"]["engine"]["runs"][0]["all_losses_finite"] is True
    assert written["ratio_engine_over_reference"] > 0


def test_the_cpu_attention_benchmark_times_each_part_and_writes_its_json(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import bench_cpu_attention
    finally:
        sys.path.remove(str(BENCH))
    args = ["--repeats", "1", "--sample-runs", "1", "--train-steps", "2", "--out", str(tmp_path)]
    assert bench_cpu_attention.main(args) == 0
    report = json.loads((tmp_path / "cpu_attention.json").read_text())
    for shape in bench_cpu_attention.SHAPES:
        timings = report["attention"][shape]
        assert set(timings) == {"shape", "sdpa_flash_cpu", "sdpa_math", "matmul_softmax"}
        assert all(t["forward_ms"] > 0 and t["forward_backward_ms"] > 0 for k, t in timings.items() if k != "shape")
    engine = report["engine_step"]
    assert 0 < engine["attention_forward_share"] + engine["attention_backward_share"] < 1
    samples = report["samples"]
    assert all(samples[key] > 0 for key in ("default_s", "one_thread_s", "sdpa_math_s", "classic_processor_s",
                                            "omp_passive_s"))
