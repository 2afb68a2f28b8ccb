"""The CUDA-graph training step on a GPU: every method and family, and resume from a checkpoint.

These need an NVIDIA GPU and are skipped without one (CI has none). On the GPU machine they run as
`python3 -m pytest --noconftest tests/test_engine_cuda.py` (the suite's conftest starts S3 servers).
The SD 1.5-sized comparison and timings are in `bench/gpu_train_bench.py --parts graphjob`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_fixtures import PROMPT, config_for, stop_after, subject, tiny  # noqa: F401 - fixtures
from flows.store_local import LocalStore
from tasks.checkpoints import CheckpointStore
from tasks.engine_config import TrainConfig, TrainingCancelled, TrainResult
from tasks.tiny_models import TINY_SDXL_RESOLUTION, build_tiny_sdxl
from tasks.train_engine import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")

CAPTURED = "training step captured as a CUDA graph"


def gpu_config(model: Path, **overrides: object) -> TrainConfig:
    options = {"max_train_steps": 10, "report_every": 1, "mixed_precision": "bf16", "use_8bit_adam": False}
    return config_for(model, **{**options, **overrides})


def run(config: TrainConfig, subject: list[Path], out: Path, caplog: pytest.LogCaptureFixture,
        **kwargs: object) -> TrainResult:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tasks.train_engine"):
        return train(config, subject, [PROMPT] * len(subject), out, **kwargs)


def assert_same_run(graphed: TrainResult, eager: TrainResult, rel: float = 2e-2) -> None:
    """Same seed, same draws: the losses agree step by step up to bf16 rounding and kernel choice."""
    assert [step for step, _ in graphed.losses] == [step for step, _ in eager.losses]
    assert [loss for _, loss in graphed.losses] == pytest.approx([loss for _, loss in eager.losses], rel=rel)


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "dreambooth"])
def test_each_method_replays_its_step_and_matches_the_eager_run(
    method: str, tiny: Path, subject: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    eager = run(gpu_config(tiny, method=method, cuda_graphs=False), subject, tmp_path / "eager", caplog)
    assert CAPTURED not in caplog.text
    graphed = run(gpu_config(tiny, method=method), subject, tmp_path / "graph", caplog)
    assert CAPTURED in caplog.text and "runs eagerly" not in caplog.text
    # The whole UNet at the fixtures' learning rate (1e-2) amplifies the channels-last kernels' rounding:
    # on an H100 one step of ten differed by 7 %, the others by under 2 %.
    assert_same_run(graphed, eager, rel=0.1 if method == "dreambooth" else 2e-2)
    if method == "dreambooth":  # it learns (1.23 -> 0.25 on an H100), and the whole UNet is saved
        assert graphed.losses[-1][1] < 0.5 * graphed.losses[0][1]
        assert (graphed.pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").exists()
    else:
        a, b = load_file(eager.adapter_file), load_file(graphed.adapter_file)
        assert a.keys() == b.keys()  # the same adapter layout, saved from the graphed run's weights


def test_sdxl_lora_replays_its_step(
    subject: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = build_tiny_sdxl(tmp_path / "tiny-sdxl")
    options = {"family": "sdxl", "resolution": TINY_SDXL_RESOLUTION}
    eager = run(gpu_config(model, cuda_graphs=False, **options), subject, tmp_path / "eager", caplog)
    graphed = run(gpu_config(model, **options), subject, tmp_path / "graph", caplog)
    assert CAPTURED in caplog.text
    assert_same_run(graphed, eager)


def test_a_graphed_run_resumes_from_its_checkpoint_with_the_learning_rate_schedule(
    tiny: Path, subject: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = gpu_config(tiny, max_train_steps=12, report_every=2, checkpoint_every=4, lr_warmup_steps=6,
                        lr_scheduler="cosine", offset_noise=0.1, snr_gamma=5.0, gradient_accumulation_steps=2)
    straight = run(config, subject, tmp_path / "straight", caplog)
    eager = run(config.model_copy(update={"cuda_graphs": False}), subject, tmp_path / "eager", caplog)
    assert_same_run(straight, eager)  # the learning rate followed its schedule inside the graph too

    store = LocalStore(tmp_path / "store", "http://x", b"k")
    checkpoints = CheckpointStore(store, "trainings/t1/checkpoints")
    with pytest.raises(TrainingCancelled, match="step 9 of 12"):
        run(config, subject, tmp_path / "first", caplog, should_stop=stop_after(9), checkpoints=checkpoints)
    assert json.loads(store.get_bytes("trainings/t1/checkpoints/latest.json"))["step"] == 8
    resumed = run(config, subject, tmp_path / "resumed", caplog, checkpoints=checkpoints)
    assert resumed.resumed_from == 8 and CAPTURED in caplog.text
    assert_same_run(resumed, straight)
