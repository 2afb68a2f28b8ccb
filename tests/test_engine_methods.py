"""LoHa, LoKr and full DreamBooth on the `tiny` model, and prior preservation with cached class images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine_fixtures import ATTENTION_PROJECTIONS, PROMPT, config_for, one_torch_thread, subject, tiny  # noqa: F401
from flows.store_local import LocalStore
from tasks import prior, sampling
from tasks.sampling import lora_output_difference, pipeline_output_difference
from tasks.train_engine import train

PARAM_SUFFIXES = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w2"),
}


def projection_modules(tiny: Path) -> set[str]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    return {name for name, _ in unet.named_modules() if name.endswith(ATTENTION_PROJECTIONS) and ".attn" in name}


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_saves_peft_keys_and_metadata_and_changes_the_image(
    method: str, tiny: Path, subject: list[Path], tmp_path: Path
) -> None:
    config = config_for(tiny, method=method, learning_rate=5e-2, max_train_steps=10, report_every=5)
    result = train(config, subject, [PROMPT] * 2, tmp_path)
    assert result.method == method and result.pipeline_dir is None
    assert result.adapter_file is not None and result.adapter_file.name == "pytorch_lycoris_weights.safetensors"

    weights = load_file(result.adapter_file)
    expected = {f"unet.{m}.{p}" for m in projection_modules(tiny) for p in PARAM_SUFFIXES[method]}
    assert set(weights) == expected
    with safe_open(str(result.adapter_file), framework="pt") as handle:
        metadata = handle.metadata()
    assert (metadata["dreamflow_method"], metadata["rank"], metadata["alpha"]) == (method, "4", "8.0")
    assert sorted(json.loads(metadata["target_modules"])) == sorted(ATTENTION_PROJECTIONS)
    assert json.loads(metadata["peft_config"])["peft_type"] == method.upper()

    difference = lora_output_difference(str(tiny), result.adapter_file, PROMPT, seed=0, resolution=64, steps=3)
    assert difference > 0.3, difference


def test_dreambooth_trains_unet_and_text_encoder_and_saves_a_pipeline(
    tiny: Path, subject: list[Path], tmp_path: Path
) -> None:
    config = config_for(
        tiny, method="dreambooth", learning_rate=1e-3, text_encoder_learning_rate=1e-3, text_encoder_steps=3,
        max_train_steps=6, report_every=3,
    )
    result = train(config, subject, [PROMPT] * 2, tmp_path)
    assert result.adapter_file is None and result.pipeline_dir == tmp_path / "pipeline"
    folder = result.pipeline_dir
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"

    base_unet = load_file(tiny / "unet" / "diffusion_pytorch_model.safetensors")
    tuned_unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert tuned_unet.keys() == base_unet.keys()
    assert not torch.equal(tuned_unet["conv_in.weight"], base_unet["conv_in.weight"])  # every layer trains
    base_te = load_file(tiny / "text_encoder" / "model.safetensors")
    tuned_te = load_file(folder / "text_encoder" / "model.safetensors")
    changed = [key for key in base_te if not torch.equal(base_te[key], tuned_te[key])]
    assert changed, "the text encoder trained for 3 steps but did not change"
    assert load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").keys()  # the rest is copied over

    assert pipeline_output_difference(str(tiny), str(folder), PROMPT, seed=0, resolution=64, steps=3) > 2.0


def test_class_images_are_generated_once_and_reused(
    tiny: Path, subject: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline loader is the real one, wrapped to count calls; nothing else is faked."""
    store = LocalStore(tmp_path / "store", "http://x", b"k")
    loads: list[str] = []
    real_loader = sampling.load_pipeline

    def counting_loader(*args: object, **kwargs: object) -> object:
        loads.append(str(args[0]))
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(sampling, "load_pipeline", counting_loader)
    args = (store, str(tiny), "sd15", "a photo of a person", 64, 3)
    first = prior.ensure_class_images(*args, seed=1, work_dir=tmp_path / "job1", steps=2)
    assert loads == [str(tiny)] and len(first) == 3
    second = prior.ensure_class_images(*args, seed=2, work_dir=tmp_path / "job2", steps=2)
    assert loads == [str(tiny)], "a second job with the same class prompt generated again"
    assert [p.read_bytes() for p in second] == [p.read_bytes() for p in first]
    keys = store.list("cache/class_images/")
    assert len(keys) == 4 and keys[-1].endswith("/manifest.json")

    prior.ensure_class_images(store, str(tiny), "sd15", "a photo of a dog", 64, 1, seed=1,
                              work_dir=tmp_path / "job3", steps=2)
    assert len(loads) == 2  # another class prompt is another cache entry

    plain = config_for(tiny, max_train_steps=4, report_every=4)
    with_prior = plain.model_copy(update={"class_prompt": "a photo of a person", "prior_loss_weight": 1.0})
    alone = train(plain, subject, [PROMPT] * 2, tmp_path / "plain")
    preserved = train(with_prior, subject, [PROMPT] * 2, tmp_path / "prior", class_images=second)
    assert preserved.final_loss != alone.final_loss  # the class term is in the loss
    a, b = load_file(alone.adapter_file), load_file(preserved.adapter_file)
    assert any(not torch.equal(a[key], b[key]) for key in a)


def test_an_empty_learning_rate_is_the_base_models_default_for_the_method() -> None:
    """A UI run that leaves the rate empty gets 2e-6 for DreamBooth, not the LoRA rate (50x too high)."""
    from flows.params import TrainingParams
    from flows.registry import load_registry
    from tasks.train import train_config

    entry = load_registry(None)["sd-1.5"]
    rates = {}
    for method in ("lora", "dreambooth"):
        params = TrainingParams(training_id="rate-check", method=method, instance_prompt="photo of sks dog",
                                images=["https://example.com/a.jpg"])
        rates[method] = train_config(params, entry, "unused", cuda=False).learning_rate
    assert rates == {"lora": entry.lora_learning_rate, "dreambooth": entry.dreambooth_learning_rate}
    assert entry.dreambooth_learning_rate < entry.lora_learning_rate
    chosen = TrainingParams(training_id="rate-check", method="dreambooth", instance_prompt="photo of sks dog",
                            images=["https://example.com/a.jpg"], learning_rate=5e-6)
    assert train_config(chosen, entry, "unused", cuda=False).learning_rate == 5e-6
