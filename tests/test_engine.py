"""The training engine end to end on the built-in `tiny` model: real diffusers, peft, accelerate.

One module-scoped training run (rank 4, alpha 8, high learning rate so its effect is clear) feeds
most tests; the rest run a few steps each.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tasks.kohya import KohyaConversionError, save_kohya_lora, to_kohya
from tasks.engine_config import TrainConfig, TrainingCancelled, TrainingDiverged, TrainResult
from tasks.engine_setup import cuda_graphs_off, prepare_session
from tasks.train_engine import _with_float_lr, train
from tasks.sampling import generate_samples, load_pipeline, lora_output_difference, make_grid, merge_adapters, render
from engine_fixtures import ATTENTION_PROJECTIONS, PROMPT, config_for, one_torch_thread, subject, tiny  # noqa: F401 - fixtures
from tasks.tiny_models import build_tiny_sd

KOHYA_KEY = re.compile(r"^(lora_unet_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def make_config(tiny: Path, **overrides: object) -> TrainConfig:
    return config_for(tiny, **{"max_train_steps": 30, "report_every": 5, **overrides})


@pytest.fixture(scope="module")
def trained(
    tiny: Path, subject: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, list[tuple[int, int, float]]]:
    reports: list[tuple[int, int, float]] = []
    result = train(
        make_config(tiny),
        subject,
        [PROMPT] * len(subject),
        tmp_path_factory.mktemp("lora"),
        on_progress=lambda event: reports.append((event.step, event.total, event.loss)),
    )
    return result, reports


def unet_projection_modules(tiny: Path) -> set[str]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    return {name for name, _ in unet.named_modules() if name.endswith(ATTENTION_PROJECTIONS) and ".attn" in name}


# --- the tiny base model -------------------------------------------------------------------


def test_tiny_build_is_deterministic_and_loads_offline(tiny: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    again = build_tiny_sd(tmp_path / "tiny")
    assert build_tiny_sd(again) == again  # second call returns at once
    first = load_file(tiny / "unet" / "diffusion_pytorch_model.safetensors")
    second = load_file(again / "unet" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)

    pipe = StableDiffusionPipeline.from_pretrained(again, local_files_only=True)
    ids = pipe.tokenizer(PROMPT).input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    assert pipe.tokenizer.model_max_length == 77
    assert not list(tmp_path.glob(".tiny-*")), "staging folder left behind"


# --- training ------------------------------------------------------------------------------


def test_training_reports_progress_and_saves_diffusers_lora_keys(
    tiny: Path, trained: tuple[TrainResult, list[tuple[int, int, float]]]
) -> None:
    result, reports = trained
    assert [(step, total) for step, total, _ in reports] == [(step, 30) for step in range(5, 31, 5)]
    assert [(step, loss) for step, _, loss in reports] == result.losses
    assert result.final_loss == reports[-1][2] and result.steps == 30
    assert result.lora_file.name == "pytorch_lora_weights.safetensors"

    weights = load_file(result.lora_file)
    modules = {key.removeprefix("unet.").rsplit(".", 2)[0] for key in weights}
    assert modules == unet_projection_modules(tiny)
    assert len(weights) == 2 * len(modules)
    for key, tensor in weights.items():
        assert key.startswith("unet.") and key.endswith((".lora_A.weight", ".lora_B.weight")), key
        assert tensor.shape[0 if key.endswith("lora_A.weight") else 1] == 4


def test_saved_metadata_carries_rank_and_alpha(trained: tuple[TrainResult, list]) -> None:
    result, _ = trained
    with safe_open(str(result.lora_file), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == 4
    assert metadata["unet.lora_alpha"] == 8.0
    assert sorted(metadata["unet.target_modules"]) == sorted(ATTENTION_PROJECTIONS)


def test_loss_falls_on_a_fixed_subject(trained: tuple[TrainResult, list]) -> None:
    losses = [loss for _, loss in trained[0].losses]
    first, last = np.mean(losses[:2]), np.mean(losses[-2:])
    assert last < 0.9 * first, losses


def test_loaded_lora_changes_the_image(tiny: Path, trained: tuple[TrainResult, list]) -> None:
    difference = lora_output_difference(str(tiny), trained[0].lora_file, PROMPT, seed=0, resolution=64, steps=4)
    assert difference > 5.0


def test_same_seed_gives_identical_weights(tiny: Path, subject: list[Path], tmp_path: Path) -> None:
    config = make_config(tiny, max_train_steps=4, report_every=2)
    first = train(config, subject, [PROMPT] * 2, tmp_path / "one")
    second = train(config, subject, [PROMPT] * 2, tmp_path / "two")
    other = train(config.model_copy(update={"seed": 1}), subject, [PROMPT] * 2, tmp_path / "three")
    a, b, c = (load_file(result.lora_file) for result in (first, second, other))
    assert first.losses == second.losses
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


def test_a_training_prepared_while_waiting_trains_as_one_prepared_in_place(
    tiny: Path, subject: list[Path], tmp_path: Path
) -> None:
    """A job prepares its images and trainable model while it waits for its GPU slot (tasks/train.py)."""
    config = make_config(tiny, max_train_steps=4, report_every=2)
    prepared = prepare_session(config, subject)
    torch.rand(1000)  # other work in the wait draws from the global generators
    random.random()
    ahead = train(config, subject, [PROMPT] * 2, tmp_path / "ahead", prepared=prepared)
    in_place = train(config, subject, [PROMPT] * 2, tmp_path / "in-place")
    a, b = load_file(ahead.lora_file), load_file(in_place.lora_file)
    assert ahead.losses == in_place.losses
    assert all(torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(ValueError, match="prepared for another training"):
        train(config.model_copy(update={"seed": 1}), subject, [PROMPT] * 2, tmp_path / "other", prepared=prepared)
    with pytest.raises(ValueError, match="prepared for another training"):
        train(config, subject[:1], [PROMPT], tmp_path / "fewer", prepared=prepared)


def test_should_stop_cancels_within_a_step(tiny: Path, subject: list[Path], tmp_path: Path) -> None:
    calls: list[int] = []

    def stop_on_third_check() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(TrainingCancelled, match="step 2 of 30"):
        train(make_config(tiny), subject, [PROMPT] * 2, tmp_path, should_stop=stop_on_third_check)
    assert len(calls) == 3
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()


def test_exploding_loss_raises_training_diverged(tiny: Path, subject: list[Path], tmp_path: Path) -> None:
    config = make_config(tiny, learning_rate=1e30, max_train_steps=6, report_every=1)
    with pytest.raises(TrainingDiverged, match="loss became"):
        train(config, subject, [PROMPT] * 2, tmp_path)


def test_mismatched_captions_are_refused(tiny: Path, subject: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one caption per image"):
        train(make_config(tiny), subject, [PROMPT], tmp_path)


# --- kohya export and reload ---------------------------------------------------------------


@pytest.fixture(scope="module")
def kohya_file(trained: tuple[TrainResult, list], tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("kohya") / "sks_person.safetensors"
    return save_kohya_lora(trained[0].lora_file, dest, alpha=8.0, rank=4, base_model="tiny")


def test_kohya_keys_map_to_real_unet_modules(tiny: Path, kohya_file: Path) -> None:
    weights = load_file(kohya_file)
    matches = [KOHYA_KEY.match(key) for key in weights]
    assert all(matches), [key for key, match in zip(weights, matches) if not match]
    modules = {match.group(1) for match in matches if match}
    expected = {"lora_unet_" + name.replace(".", "_") for name in unet_projection_modules(tiny)}
    assert modules == expected
    alphas = [tensor for key, tensor in weights.items() if key.endswith(".alpha")]
    assert len(alphas) == len(expected) and all(float(alpha) == 8.0 for alpha in alphas)


def test_kohya_metadata_is_all_strings(kohya_file: Path) -> None:
    with safe_open(str(kohya_file), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8")
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_sd_model_name"] == "tiny" and metadata["ss_output_name"] == "sks_person"
    assert all(isinstance(value, str) for value in metadata.values())


def test_text_encoder_keys_and_unknown_keys() -> None:
    tensor = torch.zeros(4, 32)
    sd = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": tensor,
        "text_encoder_2.encoder.layers.1.mlp.fc1.lora_B.weight": tensor,
    }
    assert set(to_kohya(sd, 4.0, sdxl=True)) == {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha",
        "lora_te2_text_model_encoder_layers_1_mlp_fc1.lora_up.weight",
        "lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha",
    }
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in to_kohya(sd, 4.0)
    with pytest.raises(KohyaConversionError, match="vae.decoder"):
        to_kohya({"vae.decoder.conv.lora_A.weight": tensor}, 4.0)
    with pytest.raises(KohyaConversionError, match="not a LoRA"):
        to_kohya({"unet.conv_in.weight": tensor}, 4.0)


def unet_output(pipe_factory: Callable[[], object]) -> torch.Tensor:
    """The UNet's noise prediction for one fixed input, from a freshly built pipeline."""
    pipe = pipe_factory()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, 16, 16), generator=generator)
    context = torch.randn((1, 77, 32), generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, 500, encoder_hidden_states=context).sample  # type: ignore[attr-defined]


def in_memory_pipeline(tiny: Path, lora_file: Path, alpha: float) -> object:
    """The base pipeline with the trained weights put into a fresh adapter, as training held them."""
    from peft import LoraConfig, set_peft_model_state_dict

    pipe = load_pipeline(str(tiny))
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=list(ATTENTION_PROJECTIONS)))
    weights = {key.removeprefix("unet."): value for key, value in load_file(lora_file).items()}
    result = set_peft_model_state_dict(pipe.unet, weights)
    assert not result.unexpected_keys
    return pipe


def test_alpha_differing_from_rank_reloads_the_same_model(
    tiny: Path, trained: tuple[TrainResult, list], kohya_file: Path
) -> None:
    lora_file = trained[0].lora_file
    reference = unet_output(lambda: in_memory_pipeline(tiny, lora_file, alpha=8.0))
    from_diffusers = unet_output(lambda: load_pipeline(str(tiny), lora_file))
    from_kohya = unet_output(lambda: load_pipeline(str(tiny), kohya_file))
    alpha_ignored = unet_output(lambda: in_memory_pipeline(tiny, lora_file, alpha=4.0))

    torch.testing.assert_close(from_diffusers, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_kohya, reference, rtol=1e-4, atol=1e-5)
    assert (alpha_ignored - reference).abs().max() > 1e-2  # the check above can tell alpha 4 from 8


# --- sampling ------------------------------------------------------------------------------


def test_generate_samples_and_grid(tiny: Path, trained: tuple[TrainResult, list], tmp_path: Path) -> None:
    paths = generate_samples(
        str(tiny), trained[0].lora_file, PROMPT, "blurry", count=2, seed=7, resolution=64, dest_dir=tmp_path, steps=3
    )
    images = [Image.open(path) for path in paths]
    assert [image.size for image in images] == [(64, 64)] * 2
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    again = generate_samples(
        str(tiny), trained[0].lora_file, PROMPT, "blurry", count=2, seed=7, resolution=64, dest_dir=tmp_path / "b",
        steps=3,
    )
    assert all(np.array_equal(np.asarray(Image.open(a)), np.asarray(b)) for a, b in zip(again, images))

    grid = make_grid(paths, tmp_path / "grid.png")
    with Image.open(grid) as opened:
        assert opened.size == (128, 64)
        assert np.array_equal(np.asarray(opened.convert("RGB"))[:64, 64:], np.asarray(images[1].convert("RGB")))


def pixels(image: object) -> np.ndarray:
    """An image (or the PNG at a path) as signed integers, for differences."""
    return np.asarray(Image.open(image) if isinstance(image, Path) else image, dtype=np.int16)


def test_samples_render_with_the_adapter_merged_and_look_as_unmerged(
    tiny: Path, trained: tuple[TrainResult, list], tmp_path: Path
) -> None:
    """Samples fold the adapter into the weights (faster); they show what the delivered file does."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora_file = trained[0].lora_file
    merged = generate_samples(str(tiny), lora_file, PROMPT, "blurry", count=2, seed=7, resolution=64,
                              dest_dir=tmp_path, steps=3)
    pipe = load_pipeline(str(tiny), lora_file)
    unmerged = render(pipe, PROMPT, "blurry", 2, 7, 64, 3)
    base = render(load_pipeline(str(tiny)), PROMPT, "blurry", 2, 7, 64, 3)
    merge_adapters(pipe)
    layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(layer.merged for layer in layers)
    for path, image, plain in zip(merged, unmerged, base, strict=True):
        assert np.abs(pixels(path) - pixels(image)).max() <= 1  # rounding only
        assert np.abs(pixels(path) - pixels(plain)).mean() > 1  # and the adapter shows


def test_samples_from_the_unet_the_training_handed_over_match_those_from_the_saved_file(
    tiny: Path, subject: list[Path], tmp_path: Path
) -> None:
    """A job's samples take the trained UNet from its training (no second load of the base UNet,
    no adapter file read) and show exactly what the delivered adapter file does."""
    kept: list = []
    config = make_config(tiny, max_train_steps=3, report_every=3)
    result = train(config, subject, [PROMPT] * 2, tmp_path / "model", keep_trained=kept.append)
    assert len(kept) == 1
    unet = kept[0]
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    from_file = generate_samples(str(tiny), result.lora_file, PROMPT, "blurry", count=2, seed=7, resolution=64,
                                 dest_dir=tmp_path / "file", steps=3)
    handed = generate_samples(str(tiny), result.lora_file, PROMPT, "blurry", count=2, seed=7, resolution=64,
                              dest_dir=tmp_path / "memory", steps=3, unet=unet)
    base = render(load_pipeline(str(tiny)), PROMPT, "blurry", 2, 7, 64, 3)
    for memory, file, plain in zip(handed, from_file, base, strict=True):
        assert np.abs(pixels(memory) - pixels(file)).max() <= 1  # rounding only
        assert np.abs(pixels(memory) - pixels(plain)).mean() > 1  # the adapter is in it


def test_a_dreambooth_training_hands_over_nothing(tiny: Path, subject: list[Path], tmp_path: Path) -> None:
    kept: list = []
    config = make_config(tiny, max_train_steps=1, report_every=1, method="dreambooth")
    train(config, subject, [PROMPT] * 2, tmp_path / "model", keep_trained=kept.append)
    assert kept == []  # its samples load the saved pipeline folder


def test_one_process_runs_trainings_of_different_precision(
    tiny: Path, subject: list[Path], tmp_path: Path
) -> None:
    """A worker process trains job after job; accelerate's process-wide state must not pin fp32."""
    for index, precision in enumerate(("bf16", "no")):
        config = make_config(tiny, max_train_steps=2, report_every=2, mixed_precision=precision)
        result = train(config, subject, [PROMPT] * 2, tmp_path / str(index))
        assert result.lora_file.exists() and np.isfinite(result.final_loss)


# --- CUDA graphs: capture and replay need a GPU; `bench/gpu_train_bench.py --parts graphjob` checks
# there that the graphed step matches the eager one loss by loss. Here: when the step stays eager.


def test_a_training_without_a_gpu_runs_eager_steps_and_says_why(
    tiny: Path, subject: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="tasks.engine_setup"):
        result = train(make_config(tiny, max_train_steps=2, report_every=1), subject, [PROMPT] * 2, tmp_path / "a")
    assert "training step: eager (no CUDA device)" in caplog.text
    assert result.lora_file.exists() and np.isfinite(result.final_loss)


def test_options_that_need_the_host_inside_a_step_keep_it_eager(tiny: Path) -> None:
    """A stand-in accelerator says it has a GPU (there is none here); each option alone rules the graph out."""
    gpu = SimpleNamespace(device=torch.device("cuda"), num_processes=1)
    plain = {"use_8bit_adam": False, "mixed_precision": "bf16"}
    assert cuda_graphs_off(make_config(tiny, **plain), gpu, None) is None
    assert cuda_graphs_off(make_config(tiny, **plain), SimpleNamespace(device=torch.device("cpu"), num_processes=1),
                           None) == "no CUDA device"
    assert cuda_graphs_off(make_config(tiny, **plain), SimpleNamespace(device=torch.device("cuda"), num_processes=2),
                           None) == "several processes"
    assert cuda_graphs_off(make_config(tiny, **plain), gpu, object()) == "the text encoder trains for some steps"
    for option, reason in [
        ({"cuda_graphs": False}, "cuda_graphs is off"),
        ({"compile_unet": True}, "compile_unet brings CUDA graphs of its own"),
        ({"gradient_checkpointing": True}, "gradient checkpointing"),
        ({"mixed_precision": "fp16"}, "fp16's gradient scaler decides on the host"),
    ]:
        assert cuda_graphs_off(make_config(tiny, **{**plain, **option}), gpu, None) == reason


def test_a_checkpoint_keeps_plain_learning_rates_when_the_run_held_them_as_tensors() -> None:
    """A graphed run keeps each learning rate in a device tensor; its checkpoints resume anywhere."""
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([weight], lr=torch.tensor(2e-4))
    state = _with_float_lr(optimizer.state_dict())
    assert type(state["param_groups"][0]["lr"]) is float and state["param_groups"][0]["lr"] == pytest.approx(2e-4)
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)  # the live optimizer is untouched
