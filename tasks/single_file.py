"""diffusers pipeline folder → one single-file checkpoint in the original Stable Diffusion (LDM) layout.

This is what AUTOMATIC1111, ComfyUI and diffusers' `from_single_file` read:

- UNet → `model.diffusion_model.*` (`input_blocks` / `middle_block` / `output_blocks`),
- VAE → `first_stage_model.*` (`encoder.down.N.block.M`, decoder blocks in reverse order, attention
  projections stored as 1x1 convolutions),
- SD 1.x CLIP-L → `cond_stage_model.transformer.text_model.*`; SD 2.x OpenCLIP-H →
  `cond_stage_model.model.*`; SDXL CLIP-L → `conditioner.embedders.0.transformer.text_model.*` and
  OpenCLIP-bigG → `conditioner.embedders.1.model.*` (q/k/v fused into `in_proj_*`,
  `text_projection` transposed).

Lookup tables plus one function that applies them. The tables that depend on the block layout
(how many blocks, resnets per block, which blocks have attention) are built from the UNet and VAE
configs, so the tiny test models convert with the same code as the real ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

Family = Literal["sd15", "sd2", "sdxl"]
FAMILIES: tuple[str, ...] = ("sd15", "sd2", "sdxl")


class SingleFileConversionError(ValueError):
    """A diffusers key or component has no place in the LDM layout."""


@dataclass(frozen=True)
class Rename:
    """Where a diffusers module prefix goes in the LDM layout.

    `parts` renames the module path that follows the prefix (exact match, e.g. `norm1` →
    `in_layers.0`); `fuse` sends q/k/v projections into one concatenated `in_proj_*` tensor
    (`{module: (fused module, position)}`); `conv_1x1` stores linear weights as 1x1 convolutions.
    """

    ldm: str
    parts: Mapping[str, str] = field(default_factory=dict)
    fuse: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    conv_1x1: bool = False
    transpose: bool = False


# --- fixed tables ----------------------------------------------------------------------------

# Component → prefix of its tensors in the LDM checkpoint, per family.
COMPONENT_PREFIXES: dict[str, dict[str, str]] = {
    "sd15": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.",
    },
    "sd2": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.model.",
    },
    "sdxl": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}

# Which text encoders are stored in OpenCLIP's layout (the others keep the transformers layout).
OPEN_CLIP_COMPONENTS: dict[str, frozenset[str]] = {
    "sd15": frozenset(),
    "sd2": frozenset({"text_encoder"}),
    "sdxl": frozenset({"text_encoder_2"}),
}

UNET_TOP_LEVEL: dict[str, Rename] = {
    "time_embedding.linear_1.": Rename("time_embed.0."),
    "time_embedding.linear_2.": Rename("time_embed.2."),
    "add_embedding.linear_1.": Rename("label_emb.0.0."),
    "add_embedding.linear_2.": Rename("label_emb.0.2."),
    "class_embedding.linear_1.": Rename("label_emb.0.0."),
    "class_embedding.linear_2.": Rename("label_emb.0.2."),
    "conv_in.": Rename("input_blocks.0.0."),
    "conv_norm_out.": Rename("out.0."),
    "conv_out.": Rename("out.2."),
}

UNET_RESNET_PARTS: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

VAE_TOP_LEVEL: dict[str, Rename] = {
    "encoder.conv_in.": Rename("encoder.conv_in."),
    "encoder.conv_norm_out.": Rename("encoder.norm_out."),
    "encoder.conv_out.": Rename("encoder.conv_out."),
    "decoder.conv_in.": Rename("decoder.conv_in."),
    "decoder.conv_norm_out.": Rename("decoder.norm_out."),
    "decoder.conv_out.": Rename("decoder.conv_out."),
    "quant_conv.": Rename("quant_conv."),
    "post_quant_conv.": Rename("post_quant_conv."),
}

VAE_RESNET_PARTS: dict[str, str] = {"conv_shortcut": "nin_shortcut"}

VAE_ATTENTION_PARTS: dict[str, str] = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}

CLIP_TOP_LEVEL: dict[str, Rename] = {"text_model.": Rename("text_model.")}

OPEN_CLIP_TOP_LEVEL: dict[str, Rename] = {
    "text_model.embeddings.token_embedding.": Rename("token_embedding."),
    "text_model.embeddings.position_embedding.weight": Rename("positional_embedding"),
    "text_model.final_layer_norm.": Rename("ln_final."),
    "text_projection.weight": Rename("text_projection", transpose=True),
}

OPEN_CLIP_LAYER_PARTS: dict[str, str] = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}

OPEN_CLIP_QKV: dict[str, tuple[str, int]] = {
    "self_attn.q_proj": ("attn.in_proj", 0),
    "self_attn.k_proj": ("attn.in_proj", 1),
    "self_attn.v_proj": ("attn.in_proj", 2),
}


# --- tables built from the model configs -----------------------------------------------------


def unet_table(config: Mapping[str, Any]) -> dict[str, Rename]:
    """diffusers UNet prefixes → LDM prefixes for this block layout (SD 1.x/2.x/SDXL and tiny)."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise SingleFileConversionError(f"per-block layers_per_block {per_block!r} has no LDM layout")
    table = dict(UNET_TOP_LEVEL)
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    for i in range(len(down_types)):
        for j in range(per_block):
            ldm = 1 + i * (per_block + 1) + j
            table[f"down_blocks.{i}.resnets.{j}."] = Rename(f"input_blocks.{ldm}.0.", UNET_RESNET_PARTS)
            table[f"down_blocks.{i}.attentions.{j}."] = Rename(f"input_blocks.{ldm}.1.")
        table[f"down_blocks.{i}.downsamplers.0.conv."] = Rename(f"input_blocks.{(i + 1) * (per_block + 1)}.0.op.")
    for i, block_type in enumerate(up_types):
        for j in range(per_block + 1):
            ldm = i * (per_block + 1) + j
            table[f"up_blocks.{i}.resnets.{j}."] = Rename(f"output_blocks.{ldm}.0.", UNET_RESNET_PARTS)
            table[f"up_blocks.{i}.attentions.{j}."] = Rename(f"output_blocks.{ldm}.1.")
        slot = 2 if "CrossAttn" in block_type else 1
        table[f"up_blocks.{i}.upsamplers.0."] = Rename(f"output_blocks.{i * (per_block + 1) + per_block}.{slot}.")
    table["mid_block.resnets.0."] = Rename("middle_block.0.", UNET_RESNET_PARTS)
    table["mid_block.attentions.0."] = Rename("middle_block.1.")
    table["mid_block.resnets.1."] = Rename("middle_block.2.", UNET_RESNET_PARTS)
    return table


def vae_table(config: Mapping[str, Any]) -> dict[str, Rename]:
    """diffusers AutoencoderKL prefixes → LDM prefixes (decoder blocks are numbered in reverse)."""
    blocks = len(config["block_out_channels"])
    per_block = config["layers_per_block"]
    table = dict(VAE_TOP_LEVEL)
    for i in range(blocks):
        for j in range(per_block):
            table[f"encoder.down_blocks.{i}.resnets.{j}."] = Rename(f"encoder.down.{i}.block.{j}.", VAE_RESNET_PARTS)
        table[f"encoder.down_blocks.{i}.downsamplers.0."] = Rename(f"encoder.down.{i}.downsample.")
        for j in range(per_block + 1):
            ldm = f"decoder.up.{blocks - 1 - i}.block.{j}."
            table[f"decoder.up_blocks.{i}.resnets.{j}."] = Rename(ldm, VAE_RESNET_PARTS)
        table[f"decoder.up_blocks.{i}.upsamplers.0."] = Rename(f"decoder.up.{blocks - 1 - i}.upsample.")
    for side in ("encoder", "decoder"):
        for j in range(2):
            table[f"{side}.mid_block.resnets.{j}."] = Rename(f"{side}.mid.block_{j + 1}.", VAE_RESNET_PARTS)
        table[f"{side}.mid_block.attentions.0."] = Rename(f"{side}.mid.attn_1.", VAE_ATTENTION_PARTS, conv_1x1=True)
    return table


def open_clip_table(num_layers: int) -> dict[str, Rename]:
    """transformers CLIP text-model prefixes → OpenCLIP's (`transformer.resblocks.N.*`)."""
    table = dict(OPEN_CLIP_TOP_LEVEL)
    for i in range(num_layers):
        table[f"text_model.encoder.layers.{i}."] = Rename(
            f"transformer.resblocks.{i}.", OPEN_CLIP_LAYER_PARTS, fuse=OPEN_CLIP_QKV
        )
    return table


# --- the one function that applies a table ---------------------------------------------------


def apply_table(state_dict: Mapping[str, Tensor], table: Mapping[str, Rename], prefix: str) -> dict[str, Tensor]:
    """Rename every key of `state_dict` through `table` (longest matching prefix wins)."""
    import torch

    converted: dict[str, Tensor] = {}
    fused: dict[str, dict[int, Tensor]] = {}
    for key, tensor in state_dict.items():
        target, rename, position = locate(key, table)
        if position is not None:
            fused.setdefault(prefix + target, {})[position] = tensor
            continue
        if rename.conv_1x1 and target.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        if rename.transpose:
            tensor = tensor.T
        _put(converted, prefix + target, tensor.contiguous(), key)
    for target, parts in fused.items():
        if sorted(parts) != list(range(3)):
            raise SingleFileConversionError(f"{target}: q/k/v incomplete ({sorted(parts)})")
        _put(converted, target, torch.cat([parts[i] for i in range(3)]), target)
    return converted


def locate(key: str, table: Mapping[str, Rename]) -> tuple[str, Rename, int | None]:
    """The LDM key (without component prefix) that diffusers `key` goes to, its rule, and its
    position in a fused q/k/v tensor (None when not fused)."""
    source, rename = _longest_prefix(key, table)
    module, _, param = key[len(source) :].rpartition(".")
    if module in rename.fuse:
        fused_module, position = rename.fuse[module]
        return f"{rename.ldm}{fused_module}_{param}", rename, position
    if not param:
        return rename.ldm, rename, None
    module = rename.parts.get(module, module)
    return rename.ldm + (f"{module}.{param}" if module else param), rename, None


def _longest_prefix(key: str, table: Mapping[str, Rename]) -> tuple[str, Rename]:
    if key in table:
        return key, table[key]
    segments = key.split(".")
    for end in range(len(segments) - 1, 0, -1):
        candidate = ".".join(segments[:end]) + "."
        if candidate in table:
            return candidate, table[candidate]
    raise SingleFileConversionError(f"no LDM place for diffusers key {key!r}")


def _put(converted: dict[str, Tensor], key: str, tensor: Tensor, source: str) -> None:
    if key in converted:
        raise SingleFileConversionError(f"{source!r} collides with an earlier key at {key!r}")
    converted[key] = tensor


# --- whole pipelines -------------------------------------------------------------------------


def convert_to_ldm(
    components: Mapping[str, Mapping[str, Tensor]],
    *,
    family: Family,
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
) -> dict[str, Tensor]:
    """Convert diffusers component state dicts (`unet`, `vae`, `text_encoder`[, `text_encoder_2`])
    to one LDM-layout state dict."""
    if family not in FAMILIES:
        raise SingleFileConversionError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    prefixes = COMPONENT_PREFIXES[family]
    unexpected = set(components) - set(prefixes)
    if unexpected or set(prefixes) - set(components):
        raise SingleFileConversionError(f"{family} needs components {sorted(prefixes)}, got {sorted(components)}")
    converted: dict[str, Tensor] = {}
    for name, state_dict in components.items():
        if name.startswith("text_encoder"):
            state_dict = with_text_model_scope(state_dict)
        table = component_table(name, family, unet_config, vae_config, text_layers=num_text_layers(state_dict))
        converted.update(apply_table(state_dict, table, prefixes[name]))
    return converted


def component_table(
    name: str, family: Family, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any], *, text_layers: int = 0
) -> Mapping[str, Rename]:
    """The rename table for one component (`unet`, `vae`, `text_encoder`, `text_encoder_2`)."""
    if name == "unet":
        return unet_table(unet_config)
    if name == "vae":
        return vae_table(vae_config)
    return open_clip_table(text_layers) if name in OPEN_CLIP_COMPONENTS[family] else CLIP_TOP_LEVEL


def with_text_model_scope(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys with the `text_model.` level, which LDM keys have: transformers ≥ 5.6 saves
    `CLIPTextModel` without it (`CLIPTextModelWithProjection` still has it)."""
    return {
        key if key.startswith("text_model.") or key.startswith("text_projection.") else f"text_model.{key}": value
        for key, value in state_dict.items()
    }


def num_text_layers(state_dict: Mapping[str, Tensor]) -> int:
    scope = "text_model.encoder.layers."
    return 1 + max((int(key[len(scope) :].split(".")[0]) for key in state_dict if key.startswith(scope)), default=-1)


def save_single_file(pipeline_dir: Path, dest: Path, *, family: Family, half: bool = False) -> Path:
    """Write the diffusers pipeline in `pipeline_dir` as one LDM-layout `.safetensors` at `dest`."""
    import torch
    from safetensors.torch import save_file

    pipeline_dir = Path(pipeline_dir)
    if family not in FAMILIES:
        raise SingleFileConversionError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    components = {name: load_component(pipeline_dir / name) for name in COMPONENT_PREFIXES[family]}
    converted = convert_to_ldm(
        components,
        family=family,
        unet_config=_read_config(pipeline_dir / "unet"),
        vae_config=_read_config(pipeline_dir / "vae"),
    )
    if half:
        converted = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in converted.items()}
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(converted, str(dest), metadata={"format": "pt", "dreamflow_family": family})
    logger.info("wrote single-file %s checkpoint %s (%d tensors)", family, dest, len(converted))
    return dest


def load_component(folder: Path) -> dict[str, Tensor]:
    """The full-precision weights of one diffusers/transformers component folder (sharded or not)."""
    from safetensors.torch import load_file

    for stem in ("diffusion_pytorch_model", "model"):
        index = folder / f"{stem}.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
        single = folder / f"{stem}.safetensors"
        if single.exists():
            return load_file(str(single))
    raise SingleFileConversionError(f"no safetensors weights in {folder}")


def _read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())
