"""Key layouts against the REAL SD 1.5, SD 2.1 and SDXL architectures, built on the meta device.

The models come from their published configs (tasks/published_configs.py: no weights, no download), so
every key here is a key the real checkpoints have. Two things are proven:

- single-file: our LDM state dict, converted back by diffusers' own single-file converters
  (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
  `convert_open_clip_checkpoint` — what `from_single_file` runs), gives exactly the diffusers key
  set, one to one: nothing missing, nothing extra, shapes equal;
- kohya LoRA: every module named by `to_kohya` for a LoRA on the attention projections is a real
  module, every projection has one, and each lands on a tensor of the LDM checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from engine_fixtures import one_torch_thread  # noqa: F401 - shared fixtures
import torch

from tasks.kohya import COMPONENT_PREFIXES as KOHYA_PREFIXES
from tasks.kohya import SDXL_COMPONENT_PREFIXES as KOHYA_SDXL_PREFIXES
from tasks.kohya import to_kohya
from tasks.published_configs import CLIP_VIT_L, OPEN_CLIP_BIGG, OPEN_CLIP_H, SD15_UNET, SD21_UNET, SD_VAE, SDXL_UNET
from tasks.single_file import (
    COMPONENT_PREFIXES,
    component_table,
    convert_to_ldm,
    locate,
    num_text_layers,
    with_text_model_scope,
)

UNET_PROJECTIONS = (".to_q", ".to_k", ".to_v", ".to_out.0")
TEXT_PROJECTIONS = (".q_proj", ".k_proj", ".v_proj", ".out_proj")


@dataclass(frozen=True)
class MetaPipeline:
    family: str
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    modules: dict[str, torch.nn.Module]

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: module.state_dict() for name, module in self.modules.items()}


def build_meta(family: str) -> MetaPipeline:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config = {"sd15": SD15_UNET, "sd2": SD21_UNET, "sdxl": SDXL_UNET}[family]
    with torch.device("meta"):
        modules: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel(**unet_config),
            "vae": AutoencoderKL(**SD_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**(OPEN_CLIP_H if family == "sd2" else CLIP_VIT_L))),
        }
        if family == "sdxl":
            modules["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIGG))
    return MetaPipeline(family, dict(modules["unet"].config), dict(modules["vae"].config), modules)


@pytest.fixture(scope="module", params=["sd15", "sd2", "sdxl"])
def real(request: pytest.FixtureRequest) -> MetaPipeline:
    return build_meta(request.param)


@pytest.fixture(scope="module")
def ldm(real: MetaPipeline) -> dict[str, torch.Tensor]:
    """Our single-file conversion of the real architecture's state dicts (meta tensors)."""
    return convert_to_ldm(
        real.state_dicts(),
        family=real.family,  # type: ignore[arg-type]
        unet_config=real.unet_config,
        vae_config=real.vae_config,
    )


# --- single-file -----------------------------------------------------------------------------


def diffusers_read_back(ldm: Mapping[str, torch.Tensor], real: MetaPipeline) -> dict[str, dict[str, torch.Tensor]]:
    """What diffusers' single-file loader makes of our checkpoint, component by component."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    back = {
        "unet": convert_ldm_unet_checkpoint(dict(ldm), real.unet_config),
        "vae": convert_ldm_vae_checkpoint(dict(ldm), real.vae_config),
    }
    if real.family == "sd2":
        back["text_encoder"] = convert_open_clip_checkpoint(real.modules["text_encoder"], dict(ldm))
    else:
        # diffusers strips both the SD 1.x and the SDXL CLIP-L prefix in this one converter.
        back["text_encoder"] = convert_ldm_clip_checkpoint(dict(ldm))
    if real.family == "sdxl":
        back["text_encoder_2"] = convert_open_clip_checkpoint(
            real.modules["text_encoder_2"], dict(ldm), prefix="conditioner.embedders.1.model."
        )
    # diffusers drops `text_model.` itself for flattened (transformers >= 5.6) CLIPTextModel.
    for name in ("text_encoder", "text_encoder_2"):
        if name in back and not hasattr(real.modules[name], "text_model"):
            back[name] = {k.removeprefix("text_model."): v for k, v in back[name].items()}
    return back


def test_single_file_round_trips_through_diffusers_converters(real: MetaPipeline, ldm: dict[str, torch.Tensor]) -> None:
    originals = real.state_dicts()

    prefixes = tuple(COMPONENT_PREFIXES[real.family].values())
    assert all(key.startswith(prefixes) for key in ldm)
    assert len(ldm) <= sum(len(sd) for sd in originals.values())  # only q/k/v fusing shrinks it

    back = diffusers_read_back(ldm, real)
    for name, original in originals.items():
        missing = sorted(set(original) - set(back[name]))
        extra = sorted(set(back[name]) - set(original))
        assert not missing and not extra, f"{real.family} {name}: missing {missing[:5]}, extra {extra[:5]}"
        wrong = [k for k in original if back[name][k].shape != original[k].shape]
        assert not wrong, f"{real.family} {name}: shapes differ for {wrong[:5]}"


def test_single_file_is_recognised_as_its_family(real: MetaPipeline, ldm: dict[str, torch.Tensor]) -> None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    expected = {"sd15": "v1", "sd2": "v2", "sdxl": "xl_base"}[real.family]
    assert infer_diffusers_model_type(ldm) == expected


# --- kohya LoRA ------------------------------------------------------------------------------


def lora_keys(real: MetaPipeline) -> dict[str, torch.Tensor]:
    """A diffusers/peft-format LoRA state dict on every attention projection (placeholder tensors)."""
    placeholder = torch.zeros(1)
    keys: dict[str, torch.Tensor] = {}
    for component, module in real.modules.items():
        if component == "vae":
            continue
        ends = UNET_PROJECTIONS if component == "unet" else TEXT_PROJECTIONS
        for name, _ in module.named_modules():
            if name.endswith(ends) and (component != "unet" or ".attn" in name):
                keys[f"{component}.{name}.lora_A.weight"] = placeholder
                keys[f"{component}.{name}.lora_B.weight"] = placeholder
    return keys


def test_every_kohya_key_names_a_real_module_and_none_is_missing(
    real: MetaPipeline, ldm: dict[str, torch.Tensor]
) -> None:
    sdxl = real.family == "sdxl"
    kohya_prefixes = KOHYA_SDXL_PREFIXES if sdxl else KOHYA_PREFIXES
    # kohya's own naming: component prefix + the module path in the transformers/diffusers model,
    # `text_model.` included for text encoders, dots as underscores.
    real_modules: dict[str, tuple[str, str]] = {}
    for component, module in real.modules.items():
        if component == "vae":
            continue
        for name, _ in module.named_modules():
            scoped = name if component == "unet" or name.startswith("text_model.") else f"text_model.{name}"
            real_modules[f"{kohya_prefixes[component]}_{scoped.replace('.', '_')}"] = (component, name)

    diffusers_lora = lora_keys(real)
    kohya = to_kohya(diffusers_lora, alpha=8, sdxl=sdxl)
    kohya_modules = {key.rsplit(".", 2)[0] if key.endswith("weight") else key.rsplit(".", 1)[0] for key in kohya}
    assert len(kohya) == len(diffusers_lora) + len(kohya_modules)  # down, up and one alpha each

    unknown = sorted(kohya_modules - real_modules.keys())
    assert not unknown, f"kohya names with no real module: {unknown[:5]}"
    targeted = {f"{c}.{n}" for c, n in (real_modules[m] for m in kohya_modules)}
    expected = {key.removesuffix(".lora_A.weight") for key in diffusers_lora if key.endswith(".lora_A.weight")}
    assert targeted == expected
    expected_count = {"sd15": 128 + 48, "sd2": 128 + 92, "sdxl": 560 + 48 + 128}[real.family]
    assert len(kohya_modules) == expected_count

    # …and each one lands on a weight of the LDM checkpoint that A1111/ComfyUI patch.
    tables = {
        component: component_table(
            component,
            real.family,  # type: ignore[arg-type]
            real.unet_config,
            real.vae_config,
            text_layers=num_text_layers(with_text_model_scope(real.modules[component].state_dict())),
        )
        for component in {component for component, _ in real_modules.values()}
    }
    for module_name in kohya_modules:
        component, name = real_modules[module_name]
        weight = f"{name}.weight"
        if component != "unet" and not weight.startswith("text_model."):
            weight = f"text_model.{weight}"
        target, _, _ = locate(weight, tables[component])
        assert COMPONENT_PREFIXES[real.family][component] + target in ldm, (module_name, target)
