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
