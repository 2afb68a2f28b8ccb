"""bf16 adapter weights trained through fp32 masters (tasks/master_weights.py).

On a GPU the engine uses them in its CUDA-graph step (tests/test_engine_cuda.py runs that there).
Here the same code runs on the CPU: the buffers and their arithmetic directly, then whole `tiny`
trainings with the engine's choice forced on (it picks master weights only with a CUDA graph).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from engine_fixtures import PROMPT, config_for, one_torch_thread, stop_after, subject, tiny  # noqa: F401 - fixtures
from safetensors.torch import load_file

from flows.store_local import LocalStore
from tasks import engine_setup
from tasks.checkpoints import CheckpointStore
from tasks.engine_config import ADAPTER_METHODS, TrainConfig, TrainingCancelled
from tasks.master_weights import MasterWeights
from tasks.train_engine import train


def adapter_like() -> torch.nn.Module:
    """A frozen bf16 layer with two trainable fp32 tensors, as an adapter training has them."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4, bias=False))
    module.requires_grad_(False)
    module[0].to(torch.bfloat16)
    module[1].weight.requires_grad_(True)
    module.register_parameter("scale", torch.nn.Parameter(torch.full((4,), 1.0 + 2**-12)))
    return module


def forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module[1](module[0](x)) * module.scale


def step(module: torch.nn.Module, master: MasterWeights, optimizer: torch.optim.Optimizer, batches: int = 1) -> None:
    for index in range(batches):
        master.start_backward()
        forward(module, torch.ones(2, 8, dtype=torch.bfloat16)).float().square().mean().backward()
        master.take_gradients(first=index == 0)
    optimizer.step()
    master.publish()


def test_the_module_computes_with_bf16_views_of_fp32_masters() -> None:
    module = adapter_like()
    before = module[1].weight.detach().clone()
    master = MasterWeights(module)
    weight, scale = module[1].weight, module.scale
    assert weight.dtype == scale.dtype == torch.bfloat16 and weight.requires_grad
    assert weight.untyped_storage().data_ptr() == scale.untyped_storage().data_ptr() == master.working.data_ptr()
    assert weight.grad is not None and weight.grad.untyped_storage().data_ptr() == master.working_grad.data_ptr()
    assert torch.equal(master.master_of(weight), before)  # the masters start from the fp32 values
    assert master.master_of(scale).dtype == torch.float32
    with pytest.raises(KeyError):
        master.master_of(module[0].weight)  # frozen: no master
    with pytest.raises(ValueError, match="no trainable parameters"):
        MasterWeights(torch.nn.Linear(2, 2).requires_grad_(False))


def test_updates_too_small_for_bf16_still_add_up_in_the_masters() -> None:
    """What the masters are for: steps of 1e-5 move a weight of 1 that bf16 (steps of 2**-7) cannot."""
    module = adapter_like()
    master = MasterWeights(module)
    optimizer = torch.optim.SGD(master.masters, lr=1.0)
    scale = master.master_of(module.scale)
    start = scale.detach().clone()
    for _ in range(200):
        master.master_grad.zero_()
        scale.grad.fill_(1e-5)  # stands in for a tiny gradient, every step
        optimizer.step()
        master.publish()
    assert torch.allclose(start - scale.detach(), torch.full((4,), 200e-5), rtol=2e-2)
    assert torch.equal(module.scale.detach(), scale.detach().to(torch.bfloat16))  # the module sees the result
    pure = torch.nn.Parameter(start.to(torch.bfloat16))
    for _ in range(200):
        with torch.no_grad():
            pure -= 1e-5
    assert torch.equal(pure.detach(), start.to(torch.bfloat16))  # bf16 weights alone never move


def test_gradients_of_micro_batches_add_up_and_restore_hands_back_fp32_weights() -> None:
    module = adapter_like()
    master = MasterWeights(module)
    master.start_backward()
    forward(module, torch.ones(2, 8, dtype=torch.bfloat16)).float().square().mean().backward()
    master.take_gradients(first=True)
    one = master.master_grad.clone()
    assert one.abs().sum() > 0
    master.start_backward()
    forward(module, torch.ones(2, 8, dtype=torch.bfloat16)).float().square().mean().backward()
    master.take_gradients(first=False)
    torch.testing.assert_close(master.master_grad, 2 * one)

    optimizer = torch.optim.AdamW(master.masters, lr=1e-3)
    step(module, master, optimizer, batches=2)
    master.restore()
    weight = module[1].weight
    assert weight.dtype == torch.float32 and weight.grad is None and weight.requires_grad
    assert torch.equal(weight.detach(), master.master_of(weight).detach())
    assert weight.untyped_storage().data_ptr() != master.master.data_ptr()  # a copy of its own


# --- whole trainings on `tiny`, with the engine's choice forced on (on a GPU it needs a CUDA graph) ----


@pytest.fixture
def masters_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_setup, "use_master_weights",
                        lambda config, graphs_off: config.method in ADAPTER_METHODS and config.mixed_precision == "bf16")


def bf16_config(tiny: Path, **overrides: object) -> TrainConfig:
    return config_for(tiny, **{"mixed_precision": "bf16", "use_8bit_adam": False, "report_every": 2, **overrides})


@pytest.mark.parametrize("method", ["lora", "lokr"])
def test_a_training_with_master_weights_learns_like_autocast_and_saves_fp32_weights(
    method: str, masters_on: None, tiny: Path, subject: list[Path], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = bf16_config(tiny, method=method, max_train_steps=8)
    with caplog.at_level(logging.INFO, logger="tasks.engine_setup"):
        mastered = train(config, subject, [PROMPT] * 2, tmp_path / "master")
    assert "bf16 compute with fp32 master weights" in caplog.text
    with pytest.MonkeyPatch.context() as undo:
        undo.setattr(engine_setup, "use_master_weights", lambda config, graphs_off: False)
        autocast = train(config, subject, [PROMPT] * 2, tmp_path / "autocast")
    # Same draws; the step computes in bf16 either way, so the losses agree up to its rounding.
    assert [loss for _, loss in mastered.losses] == pytest.approx([loss for _, loss in autocast.losses], rel=5e-2)
    saved, reference = load_file(mastered.adapter_file), load_file(autocast.adapter_file)
    assert saved.keys() == reference.keys()
    trained = [value for value in saved.values() if value.abs().sum() > 0]
    assert trained and all(value.dtype == torch.float32 for value in saved.values())
    # fp32 masters were saved, not their bf16 copies: some values are not bf16 numbers
    assert any(not torch.equal(value, value.to(torch.bfloat16).float()) for value in trained)


def test_a_checkpoint_of_master_weights_resumes_in_either_kind_of_run(
    masters_on: None, tiny: Path, subject: list[Path], tmp_path: Path
) -> None:
    config = bf16_config(tiny, max_train_steps=8, checkpoint_every=4, gradient_accumulation_steps=2,
                         lr_scheduler="cosine", lr_warmup_steps=2)
    straight = train(config, subject, [PROMPT] * 2, tmp_path / "straight")
    store = LocalStore(tmp_path / "store", "http://x", b"k")
    with pytest.raises(TrainingCancelled, match="step 5 of 8"):
        train(config, subject, [PROMPT] * 2, tmp_path / "first", should_stop=stop_after(5),
              checkpoints=CheckpointStore(store, "t/checkpoints"))
    assert json.loads(store.get_bytes("t/checkpoints/latest.json"))["step"] == 4
    for copy in ("resumed", "resumed-without"):  # one copy of the checkpoint for each run that resumes
        for key in store.list("t/checkpoints/"):
            store.put_bytes(key.replace("t/", f"{copy}/", 1), store.get_bytes(key))

    resumed = train(config, subject, [PROMPT] * 2, tmp_path / "resumed",
                    checkpoints=CheckpointStore(store, "resumed/checkpoints"))
    assert resumed.resumed_from == 4
    assert [loss for _, loss in resumed.losses] == pytest.approx([loss for _, loss in straight.losses], rel=1e-5)
    a, b = load_file(straight.adapter_file), load_file(resumed.adapter_file)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)

    with pytest.MonkeyPatch.context() as undo:  # a worker whose step keeps autocast takes it over
        undo.setattr(engine_setup, "use_master_weights", lambda config, graphs_off: False)
        other = train(config, subject, [PROMPT] * 2, tmp_path / "other",
                      checkpoints=CheckpointStore(store, "resumed-without/checkpoints"))
    assert other.resumed_from == 4 and [step for step, _ in other.losses] == [step for step, _ in straight.losses]
    assert [loss for _, loss in other.losses][:2] == [loss for _, loss in straight.losses][:2]  # the history it took over
    assert [loss for _, loss in other.losses][2:] == pytest.approx([loss for _, loss in straight.losses][2:], rel=5e-2)
