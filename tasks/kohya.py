"""diffusers/peft LoRA → kohya-ss format (what AUTOMATIC1111 and ComfyUI load).

Lookup tables plus one function that applies them: a diffusers key
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight` becomes
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`, and each
module gets a scalar `<module>.alpha` tensor holding the trained alpha.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

# diffusers component prefix → kohya module prefix
COMPONENT_PREFIXES: dict[str, str] = {
    "unet": "lora_unet",
    "text_encoder": "lora_te",
    "text_encoder_2": "lora_te2",
}

# SDXL checkpoints name their first text encoder `lora_te1`, not `lora_te`.
SDXL_COMPONENT_PREFIXES: dict[str, str] = {**COMPONENT_PREFIXES, "text_encoder": "lora_te1"}

# diffusers/peft weight suffix → kohya weight suffix
WEIGHT_SUFFIXES: dict[str, str] = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
}

# Text encoders saved from a flattened transformers CLIPTextModel lack the `text_model.` level
# that kohya names carry.
TEXT_MODEL_SCOPE = "text_model."

BASE_MODEL_VERSIONS: dict[str, str] = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


class KohyaConversionError(ValueError):
    """A LoRA key has no kohya equivalent."""


def to_kohya(state_dict: Mapping[str, Tensor], alpha: float, *, sdxl: bool = False) -> dict[str, Tensor]:
    """Rename a diffusers/peft LoRA state dict to kohya keys and add one `.alpha` per module."""
    import torch

    prefixes = SDXL_COMPONENT_PREFIXES if sdxl else COMPONENT_PREFIXES
    converted: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        module, suffix = _split_key(key, prefixes)
        converted[f"{module}.{suffix}"] = tensor
        converted.setdefault(f"{module}.alpha", torch.tensor(float(alpha), dtype=torch.float32))
    return converted


def _split_key(key: str, prefixes: Mapping[str, str]) -> tuple[str, str]:
    """`unet.a.b.to_q.lora_A.weight` → (`lora_unet_a_b_to_q`, `lora_down.weight`)."""
    component, _, rest = key.partition(".")
    if component not in prefixes:
        raise KohyaConversionError(f"cannot map LoRA key {key!r}: unknown component {component!r}")
    for diffusers_suffix, kohya_suffix in WEIGHT_SUFFIXES.items():
        if rest.endswith("." + diffusers_suffix):
            return kohya_module_name(component, rest.removesuffix("." + diffusers_suffix), prefixes), kohya_suffix
    raise KohyaConversionError(f"cannot map LoRA key {key!r}: not a LoRA down/up weight")


def kohya_module_name(component: str, module_path: str, prefixes: Mapping[str, str] = COMPONENT_PREFIXES) -> str:
    """`unet`, `a.b.to_q` → `lora_unet_a_b_to_q`; text encoders always carry `text_model.`."""
    if component not in prefixes:
        raise KohyaConversionError(f"unknown component {component!r} for module {module_path!r}")
    if component.startswith("text_encoder") and not module_path.startswith(TEXT_MODEL_SCOPE):
        module_path = TEXT_MODEL_SCOPE + module_path
    return f"{prefixes[component]}_{module_path.replace('.', '_')}"


def kohya_metadata(
    *, alpha: float, rank: int, base_model: str, family: str, output_name: str
) -> dict[str, str]:
    """The `ss_*` safetensors header that kohya-trained files carry (all values strings)."""
    if family not in BASE_MODEL_VERSIONS:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(BASE_MODEL_VERSIONS)}")
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _number_text(alpha),
        "ss_base_model_version": BASE_MODEL_VERSIONS[family],
        "ss_sd_model_name": base_model,
        "ss_output_name": output_name,
        "ss_network_args": json.dumps({}),
        "ss_v2": str(family == "sd2"),
        "ss_training_comment": "trained with dreamflow",
    }


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def save_kohya_lora(
    diffusers_lora_file: Path,
    dest: Path,
    *,
    alpha: float,
    rank: int,
    base_model: str,
    family: str = "sd15",
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Convert a diffusers LoRA file to a kohya-format `.safetensors` file at `dest`."""
    from safetensors.torch import load_file, save_file

    state_dict = load_file(str(diffusers_lora_file))
    converted = {key: value.contiguous() for key, value in to_kohya(state_dict, alpha, sdxl=family == "sdxl").items()}
    metadata = kohya_metadata(alpha=alpha, rank=rank, base_model=base_model, family=family, output_name=dest.stem)
    metadata.update({key: str(value) for key, value in (extra_metadata or {}).items()})
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(converted, str(dest), metadata=metadata)
    logger.info("wrote kohya LoRA %s (%d tensors)", dest, len(converted))
    return dest
