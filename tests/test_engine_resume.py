"""Checkpoints to the object store and step-exact resume, on the `tiny` model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_fixtures import PROMPT, config_for, one_torch_thread, stop_after, subject, tiny  # noqa: F401
from flows.store_local import LocalStore
from tasks.checkpoints import CheckpointStore
from tasks.engine_config import TrainingCancelled
from tasks.train_engine import run_inputs, train


def test_interrupted_and_resumed_run_reaches_the_same_weights(
    tiny: Path, subject: list[Path], tmp_path: Path
) -> None:
    config = config_for(
        tiny, max_train_steps=8, report_every=2, checkpoint_every=2, lr_warmup_steps=3, lr_scheduler="cosine",
        offset_noise=0.1, snr_gamma=5.0, gradient_accumulation_steps=2,
    )
    straight = train(config, subject, [PROMPT] * 2, tmp_path / "straight")

    store = LocalStore(tmp_path / "store", "http://x", b"k")
    checkpoints = CheckpointStore(store, "trainings/t1/checkpoints")
    with pytest.raises(TrainingCancelled, match="step 5 of 8"):
        train(config, subject, [PROMPT] * 2, tmp_path / "first", should_stop=stop_after(5),
              checkpoints=checkpoints)
    pointer = json.loads(store.get_bytes("trainings/t1/checkpoints/latest.json"))
    assert pointer == {"step": 4, "folder": "step-00000004", "inputs": run_inputs(config, subject, [PROMPT] * 2)}
    assert {key.split("/")[3] for key in store.list("trainings/t1/checkpoints/step-")} == {"step-00000004"}

    resumed = train(config, subject, [PROMPT] * 2, tmp_path / "resumed", checkpoints=checkpoints)
    assert resumed.resumed_from == 4 and straight.resumed_from == 0
    assert [step for step, _ in resumed.losses] == [step for step, _ in straight.losses]
    assert [loss for _, loss in resumed.losses] == pytest.approx([loss for _, loss in straight.losses], rel=1e-5)
    a, b = load_file(straight.adapter_file), load_file(resumed.adapter_file)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_a_half_written_checkpoint_is_ignored(tiny: Path, subject: list[Path], tmp_path: Path) -> None:
    """Files of step 2 uploaded but the pointer never written: the run starts from scratch."""
    store = LocalStore(tmp_path / "store", "http://x", b"k")
    store.put_bytes("ck/step-00000002/trainable.safetensors", b"partial")
    config = config_for(tiny, max_train_steps=2, report_every=2)
    result = train(config, subject, [PROMPT] * 2, tmp_path / "out", checkpoints=CheckpointStore(store, "ck"))
    assert result.resumed_from == 0 and result.adapter_file.exists()


def test_a_checkpoint_of_other_images_or_settings_is_not_resumed_from(
    tiny: Path, subject: list[Path], tmp_path: Path
) -> None:
    """An earlier attempt under the same training id (a retraining run cancelled before its dataset
    changed, say) left a checkpoint: a run on other inputs starts over instead of taking it."""
    store = LocalStore(tmp_path / "store", "http://x", b"k")
    config = config_for(tiny, max_train_steps=4, report_every=2, checkpoint_every=2)
    with pytest.raises(TrainingCancelled):
        train(config, subject, [PROMPT] * 2, tmp_path / "first", should_stop=stop_after(3),
              checkpoints=CheckpointStore(store, "ck"))
    assert json.loads(store.get_bytes("ck/latest.json"))["step"] == 2

    def left_behind(name: str) -> CheckpointStore:  # a copy of that checkpoint for each run below
        for key in store.list("ck/"):
            store.put_bytes(f"{name}/{key}", store.get_bytes(key))
        return CheckpointStore(store, f"{name}/ck")

    fresh = train(config, subject, [PROMPT] * 2, tmp_path / "fresh")
    runs = {
        "other images": train(config, subject[::-1], [PROMPT] * 2, tmp_path / "images",
                              checkpoints=left_behind("images")),
        "other captions": train(config, subject, [PROMPT, f"{PROMPT}, smiling"], tmp_path / "captions",
                                checkpoints=left_behind("captions")),
        "other settings": train(config.model_copy(update={"learning_rate": 2e-4}), subject, [PROMPT] * 2,
                                tmp_path / "settings", checkpoints=left_behind("settings")),
        # the same inputs, with only how often it reports changed: this one resumes
        "same inputs": train(config.model_copy(update={"report_every": 1}), subject, [PROMPT] * 2,
                             tmp_path / "same", checkpoints=left_behind("same")),
    }
    assert {name: run.resumed_from for name, run in runs.items()} == {
        "other images": 0, "other captions": 0, "other settings": 0, "same inputs": 2}
    assert [step for step, _ in runs["other images"].losses] == [step for step, _ in fresh.losses] == [2, 4]
    assert json.loads(store.get_bytes("images/ck/latest.json"))["inputs"] == run_inputs(
        config, subject[::-1], [PROMPT] * 2)  # the run's own checkpoint replaced the stale one


def test_a_store_outage_at_a_checkpoint_does_not_end_the_training(
    tiny: Path, subject: list[Path], tmp_path: Path
) -> None:
    """S3 stopped for 30 s while a checkpoint was due failed a whole training once."""
    from flows.store import StorageUnavailable

    class Outage(LocalStore):
        def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
            raise StorageUnavailable("S3 server unreachable or failing (test)")

    store = Outage(tmp_path / "store", "http://x", b"k")
    config = config_for(tiny, max_train_steps=4, report_every=2, checkpoint_every=2)
    result = train(config, subject, [PROMPT] * 2, tmp_path / "out", checkpoints=CheckpointStore(store, "ck"))
    assert result.adapter_file.exists() and [step for step, _ in result.losses] == [2, 4]
    assert not store.exists("ck/latest.json")
