"""peft LoHa/LoKr adapters → the LyCORIS kohya layout that A1111, ComfyUI and LyCORIS itself load.

Lookup tables plus one function that applies them: a peft key
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.hada_w1_a.default` becomes
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a`, and each module
gets one `.alpha` scalar.

Scale. peft multiplies every LoHa and LoKr delta by `alpha / r`. The LyCORIS loaders (A1111's
`network_hada`/`network_lokr`, ComfyUI, LyCORIS, and diffusers' `_bake_lokr_alpha_`) multiply a
LoHa delta by `alpha / rank`, the same, but a LoKr delta by `alpha / rank` only when one of its
Kronecker factors is rank-decomposed (`lokr_w1_a/_b` or `lokr_w2_a/_b`): with both factors full
they apply no scale at all. For that case the export folds peft's `alpha / r` into `lokr_w1`, so
every loader computes the delta peft trained.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tasks.kohya import COMPONENT_PREFIXES, SDXL_COMPONENT_PREFIXES, kohya_metadata, kohya_module_name

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

Method = Literal["loha", "lokr"]

# peft parameter name → LyCORIS weight name (the same words: LyCORIS named them first).
WEIGHT_NAMES: dict[str, dict[str, str]] = {
    "loha": {name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    "lokr": {
        name: name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    },
}

# LoKr weights whose presence means a factor is rank-decomposed (so loaders apply alpha / rank).
LOKR_DECOMPOSED = ("lokr_w1_b", "lokr_w2_b")

# Outer scopes peft adds around the adapted model; not part of the module path.
PEFT_SCOPES = ("base_model.model.",)

NETWORK_MODULE = "lycoris.kohya"


class LycorisConversionError(ValueError):
    """A key is not a LoHa/LoKr weight of the chosen method."""


def to_lycoris_kohya(
    peft_state_dict: Mapping[str, Tensor], method: Method, alpha: float, rank: int, *, sdxl: bool = False
) -> dict[str, Tensor]:
    """Rename a peft LoHa/LoKr state dict to LyCORIS kohya keys and add one `.alpha` per module.

    Keys may carry a component (`unet.`, `text_encoder.`, `text_encoder_2.`; none means the UNet),
    peft's `base_model.model.` scope and a trailing adapter name (`.default`).
    """
    import torch

    if method not in WEIGHT_NAMES:
        raise LycorisConversionError(f"unknown method {method!r}; expected one of {sorted(WEIGHT_NAMES)}")
    prefixes = SDXL_COMPONENT_PREFIXES if sdxl else COMPONENT_PREFIXES
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in peft_state_dict.items():
        component, module_path, weight = parse_peft_key(key, method, prefixes)
        modules.setdefault(kohya_module_name(component, module_path, prefixes), {})[weight] = tensor
    converted: dict[str, Tensor] = {}
    for module, weights in modules.items():
        if method == "lokr" and not any(name in weights for name in LOKR_DECOMPOSED):
            weights = {**weights, "lokr_w1": weights["lokr_w1"] * (alpha / rank)}
        converted.update({f"{module}.{WEIGHT_NAMES[method][name]}": t.contiguous() for name, t in weights.items()})
        converted[f"{module}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return converted


def parse_peft_key(key: str, method: Method, prefixes: Mapping[str, str]) -> tuple[str, str, str]:
    """`unet.a.to_q.hada_w1_a.default` → (`unet`, `a.to_q`, `hada_w1_a`)."""
    names = WEIGHT_NAMES[method]
    segments = key.split(".")
    if segments[-1] not in names and len(segments) > 1 and segments[-2] in names:
        segments = segments[:-1]  # adapter name
    if segments[-1] not in names:
        raise LycorisConversionError(f"cannot map {key!r}: not a {method} weight")
    path = ".".join(segments[:-1])
    for scope in PEFT_SCOPES:
        path = path.removeprefix(scope)
    component, _, rest = path.partition(".")
    if component in prefixes:
        return component, rest, segments[-1]
    return "unet", path, segments[-1]


def from_lycoris_kohya(
    state_dict: Mapping[str, Tensor],
    module_paths: Mapping[str, Iterable[str]],
    *,
    rank: int,
    sdxl: bool = False,
) -> dict[str, Tensor]:
    """The inverse: LyCORIS kohya keys → peft keys `<component>.<module>.<weight>` (no adapter
    name), undoing the LoKr scale fold. `module_paths` lists each component's module names."""
    prefixes = SDXL_COMPONENT_PREFIXES if sdxl else COMPONENT_PREFIXES
    names = {kohya_module_name(c, path, prefixes): (c, path) for c, paths in module_paths.items() for path in paths}
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        module, _, weight = key.rpartition(".")
        groups.setdefault(module, {})[weight] = tensor
    peft: dict[str, Tensor] = {}
    for module, weights in groups.items():
        if module not in names:
            raise LycorisConversionError(f"{module!r} names no module of the model")
        component, path = names[module]
        alpha = float(weights.pop("alpha"))
        if "lokr_w1" in weights and not any(name in weights for name in LOKR_DECOMPOSED):
            weights["lokr_w1"] = weights["lokr_w1"] / (alpha / rank)
        peft.update({f"{component}.{path}.{weight}": tensor for weight, tensor in weights.items()})
    return peft


def save_lycoris(
    peft_state_dict: Mapping[str, Tensor],
    dest: Path,
    *,
    method: Method,
    alpha: float,
    rank: int,
    base_model: str,
    family: str = "sd15",
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a peft LoHa/LoKr state dict as a LyCORIS `.safetensors` file with `ss_*` metadata."""
    from safetensors.torch import save_file

    converted = to_lycoris_kohya(peft_state_dict, method, alpha, rank, sdxl=family == "sdxl")
    metadata = kohya_metadata(alpha=alpha, rank=rank, base_model=base_model, family=family, output_name=dest.stem)
    metadata["ss_network_module"] = NETWORK_MODULE
    metadata["ss_network_args"] = json.dumps({"algo": method})
    metadata.update({key: str(value) for key, value in (extra_metadata or {}).items()})
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(converted, str(dest), metadata=metadata)
    logger.info("wrote LyCORIS %s %s (%d tensors)", method, dest, len(converted))
    return dest
