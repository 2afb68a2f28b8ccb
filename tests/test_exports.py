"""Every export format loaded back by the library that consumes it, on the built-in `tiny` model.

- single-file checkpoint (fp32 and fp16): diffusers' `StableDiffusionPipeline.from_single_file`,
  offline, with `config=` the tiny diffusers folder; same weights, same image for the same seed;
- LyCORIS LoHa / LoKr: diffusers 0.42 cannot load SD LoHa/LoKr files (its `load_lora_weights`
  for SD pipelines converts kohya LoRA keys only), so no consumer library here reads them. What is
  checked instead: the key layout, our own inverse giving back peft's tensors exactly, and the
  weight delta a LyCORIS loader computes from the file equal to peft's `get_delta_weight` — for
  LoKr through diffusers' own `_bake_lokr_alpha_` (its LyCORIS alpha rule, used for Flux2/Z-Image
  LoKr files), for LoHa through the A1111/ComfyUI formula `(w1a@w1b)*(w2a@w2b)*alpha/rank` written
  out below;
- the loss-curve PNG.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import one_torch_thread, tiny  # noqa: F401 - shared fixtures
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tasks.lycoris_export import from_lycoris_kohya, save_lycoris, to_lycoris_kohya
from tasks.report_plots import LOSS_CURVE_SIZE, loss_curve_png
from tasks.single_file import save_single_file
from tasks.tiny_models import TINY_RESOLUTION

PROMPT = "photo of sks person"
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]
LDM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
MODULE = r"lora_unet_[a-z0-9_]+_attn[12]_(?:to_q|to_k|to_v|to_out_0)"
LOHA_KEY = re.compile(rf"^{MODULE}\.(hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b|alpha)$")
LOKR_KEY = re.compile(rf"^{MODULE}\.(lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|alpha)$")


@pytest.fixture(scope="module")
def folder_image(tiny: Path) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    return render(StableDiffusionPipeline.from_pretrained(tiny, local_files_only=True))


def render(pipe: object) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipe(  # type: ignore[operator]
        PROMPT,
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        generator=generator,
        output_type="np",
    )
    return np.asarray(out.images[0], dtype=np.float32)


# --- single-file checkpoint --------------------------------------------------------------------


def test_single_file_loads_in_diffusers_and_renders_the_same_image(
    tiny: Path, folder_image: np.ndarray, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    path = save_single_file(tiny, tmp_path / "tiny.safetensors", family="sd15")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["dreamflow_family"] == "sd15"
    assert all(key.startswith(LDM_PREFIXES) for key in keys)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert load_file(str(path))["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv

    # config= is the tiny diffusers folder: the tiny block layout is not one diffusers can infer
    # from the file (it would fetch the SD 1.5 configs from the hub otherwise).
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny), local_files_only=True)
    folder = StableDiffusionPipeline.from_pretrained(tiny, local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(folder, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert np.abs(render(pipe) - folder_image).max() < 1e-5


def test_fp16_single_file_is_half_and_loads(tiny: Path, folder_image: np.ndarray, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    path = save_single_file(tiny, tmp_path / "tiny-fp16.safetensors", family="sd15", half=True)
    tensors = load_file(str(path))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    full = save_single_file(tiny, tmp_path / "tiny-fp32.safetensors", family="sd15")
    assert path.stat().st_size < 0.6 * full.stat().st_size

    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tiny), local_files_only=True, torch_dtype=torch.float16
    )
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    pipe.to(torch.float32)  # render on CPU in fp32 from the fp16 weights
    assert np.abs(render(pipe) - folder_image).max() < 0.05


def test_the_fp16_diffusers_folder_is_half_and_loads(tiny: Path, folder_image: np.ndarray, tmp_path: Path) -> None:
    """`half_precision` also halves the diffusers export (it halved only the single file once)."""
    from diffusers import StableDiffusionPipeline

    from tasks.convert import half_folder

    half = half_folder(tiny, tmp_path / "half")
    weights = sorted(half.rglob("*.safetensors"))
    assert len(weights) == len(list(tiny.rglob("*.safetensors"))) >= 3
    for path in weights:
        assert {t.dtype for t in load_file(str(path)).values()} == {torch.float16}, path
        assert path.stat().st_size < 0.6 * (tiny / path.relative_to(half)).stat().st_size
    pipe = StableDiffusionPipeline.from_pretrained(half, local_files_only=True, torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    pipe.to(torch.float32)  # render on CPU in fp32 from the fp16 weights
    assert np.abs(render(pipe) - folder_image).max() < 0.05


# --- LyCORIS LoHa / LoKr ---------------------------------------------------------------------


def adapted_unet(tiny: Path, method: str, **options: object) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    config_class = LoHaConfig if method == "loha" else LoKrConfig
    config = config_class(target_modules=ATTENTION_PROJECTIONS, init_weights=False, **options)
    return inject_adapter_in_model(config, unet)


def peft_deltas(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.get_delta_weight("default").detach()
        for name, module in unet.named_modules()
        if hasattr(module, "get_delta_weight") and name.endswith(tuple(ATTENTION_PROJECTIONS))
    }


def loha_delta(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The delta A1111's `network_hada` and ComfyUI compute for one LoHa module."""
    w1 = weights["hada_w1_a"] @ weights["hada_w1_b"]
    w2 = weights["hada_w2_a"] @ weights["hada_w2_b"]
    return w1 * w2 * (float(weights["alpha"]) / weights["hada_w1_b"].shape[0])


def lokr_deltas(file_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoKr deltas after diffusers' own LyCORIS alpha rule (`_bake_lokr_alpha_`)."""
    from diffusers.loaders.lora_conversion_utils import _bake_lokr_alpha_

    baked = dict(file_state)
    _bake_lokr_alpha_(baked)
    assert not any(key.endswith(".alpha") for key in baked)
    modules = {key.rsplit(".", 1)[0] for key in baked}

    def factor(module: str, n: int) -> torch.Tensor:
        full = baked.get(f"{module}.lokr_w{n}")
        return full if full is not None else baked[f"{module}.lokr_w{n}_a"] @ baked[f"{module}.lokr_w{n}_b"]

    return {module: torch.kron(factor(module, 1), factor(module, 2)) for module in modules}


def module_paths(unet: torch.nn.Module) -> dict[str, list[str]]:
    return {"unet": [name for name, _ in unet.named_modules()]}


def check_round_trip(unet: torch.nn.Module, exported: dict[str, torch.Tensor], rank: int) -> None:
    """Our inverse gives back exactly the tensors peft holds (keys as `unet.<module>.<weight>`)."""
    from peft import get_peft_model_state_dict

    peft_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    back = from_lycoris_kohya(exported, module_paths(unet), rank=rank)
    assert back.keys() == peft_state.keys()
    for key, tensor in peft_state.items():
        torch.testing.assert_close(back[key], tensor, rtol=1e-6, atol=0)


def test_loha_export_layout_round_trip_and_delta(tiny: Path, tmp_path: Path) -> None:
    unet = adapted_unet(tiny, "loha", r=4, alpha=8)
    raw = {k: v for k, v in unet.state_dict().items() if ".hada_" in k}  # `….hada_w1_a.default`
    assert all(k.endswith(".default") for k in raw)
    path = save_lycoris(raw, tmp_path / "loha.safetensors", method="loha", alpha=8, rank=4, base_model="tiny")

    exported = load_file(str(path))
    assert all(LOHA_KEY.match(key) for key in exported), [k for k in exported if not LOHA_KEY.match(k)][:3]
    modules = {key.rsplit(".", 1)[0] for key in exported}
    assert len(modules) == len(peft_deltas(unet)) and len(exported) == 5 * len(modules)
    assert all(float(exported[f"{m}.alpha"]) == 8.0 for m in modules)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "loha"}
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8"

    check_round_trip(unet, exported, rank=4)
    deltas = peft_deltas(unet)
    for name, delta in deltas.items():
        module = "lora_unet_" + name.replace(".", "_")
        weights = {key.rsplit(".", 1)[1]: exported[key] for key in exported if key.rsplit(".", 1)[0] == module}
        torch.testing.assert_close(loha_delta(weights), delta)


@pytest.mark.parametrize(
    ("options", "decomposed"),
    [({"r": 4, "alpha": 8}, False), ({"r": 1, "alpha": 2, "decompose_both": True}, True)],
    ids=["full-factors", "decomposed-factors"],
)
def test_lokr_export_layout_round_trip_and_delta(
    tiny: Path, tmp_path: Path, options: dict[str, object], decomposed: bool
) -> None:
    from peft import get_peft_model_state_dict

    unet = adapted_unet(tiny, "lokr", **options)
    rank, alpha = int(options["r"]), float(options["alpha"])  # type: ignore[call-overload, arg-type]
    peft_state = get_peft_model_state_dict(unet)
    assert any("lokr_w1_a" in k for k in peft_state) == decomposed
    path = save_lycoris(
        peft_state, tmp_path / "lokr.safetensors", method="lokr", alpha=alpha, rank=rank, base_model="tiny"
    )

    exported = load_file(str(path))
    assert all(LOKR_KEY.match(key) for key in exported), [k for k in exported if not LOKR_KEY.match(k)][:3]
    assert any(key.endswith(".lokr_w1_b") for key in exported) == decomposed
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["ss_network_args"]) == {"algo": "lokr"}

    check_round_trip(unet, exported, rank=rank)
    consumer = lokr_deltas(exported)
    deltas = peft_deltas(unet)
    assert len(consumer) == len(deltas)
    for name, delta in deltas.items():
        torch.testing.assert_close(consumer["lora_unet_" + name.replace(".", "_")].reshape(delta.shape), delta)


def test_lycoris_keys_from_peft_with_and_without_adapter_name_agree(tiny: Path) -> None:
    from peft import get_peft_model_state_dict

    unet = adapted_unet(tiny, "loha", r=2, alpha=2)
    raw = {k: v for k, v in unet.state_dict().items() if ".hada_" in k}
    plain = get_peft_model_state_dict(unet)
    first, second = to_lycoris_kohya(raw, "loha", 2, 2), to_lycoris_kohya(plain, "loha", 2, 2)
    assert first.keys() == second.keys()
    assert to_lycoris_kohya({f"unet.{k}": v for k, v in plain.items()}, "loha", 2, 2).keys() == first.keys()


# --- loss curve --------------------------------------------------------------------------------


def test_loss_curve_is_a_png_of_the_expected_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    falling = [(step, float(1 / (1 + step / 20) + rng.normal(0, 0.02))) for step in range(0, 200, 5)]
    rising = [(step, loss) for step, (_, loss) in zip(range(0, 200, 5), reversed(falling), strict=True)]
    down = loss_curve_png(falling, tmp_path / "down.png")
    up = loss_curve_png(rising, tmp_path / "up.png")

    assert down.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(down) as a, Image.open(up) as b:
        assert a.format == "PNG" and a.size == LOSS_CURVE_SIZE
        pixels_a, pixels_b = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    assert (pixels_a != 255).any(), "blank image"
    assert (pixels_a != pixels_b).any(axis=-1).sum() > 500  # the curves go opposite ways
    # the smoothed (dark blue) line starts high on the left for a falling series, low for a rising
    blue_rows_a = np.nonzero((pixels_a[:, 66:90] == (20, 90, 190)).all(axis=-1))[0]
    blue_rows_b = np.nonzero((pixels_b[:, 66:90] == (20, 90, 190)).all(axis=-1))[0]
    assert blue_rows_a.mean() < blue_rows_b.mean()


def test_loss_curve_handles_one_point_and_refuses_none(tmp_path: Path) -> None:
    with Image.open(loss_curve_png([(1, 0.5)], tmp_path / "one.png")) as image:
        assert image.size == LOSS_CURVE_SIZE
    with pytest.raises(ValueError):
        loss_curve_png([(1, float("nan"))], tmp_path / "none.png")
