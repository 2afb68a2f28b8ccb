"""UNet adapters (LoRA, LoHa, LoKr through peft): create, save, and load them back.

LoRA is saved in diffusers' format (`save_lora_weights`; `load_lora_weights` reads it). LoHa and
LoKr, which diffusers' loader does not read, are saved as peft's state dict with a `unet.` prefix
(`unet.<module>.hada_w1_a`, ... / `unet.<module>.lokr_w1`, ...) plus string metadata naming the
method, rank, alpha, target modules and the full peft config, enough to convert them to the
A1111/ComfyUI LyCORIS layout or to re-create the adapter on a fresh UNet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.engine_config import LORA_WEIGHT_NAME, LYCORIS_WEIGHT_NAME

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

METHOD_KEY = "dreamflow_method"


def adapter_config(method: str, rank: int, alpha: float, target_modules: list[str]) -> Any:
    """The peft config of one adapter method; every one starts as the identity (zero update)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    if method == "loha":
        return LoHaConfig(r=rank, alpha=alpha, init_weights=True, target_modules=target_modules)
    if method == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, init_weights=True, target_modules=target_modules)
    raise ValueError(f"not an adapter method: {method!r}")


def adapter_state_dict(unet: UNet2DConditionModel) -> dict[str, Any]:
    """The adapter's trainable tensors, fp32 on CPU, keyed `unet.<module>.<param>`."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet)
    return {f"unet.{key}": value.detach().float().cpu().contiguous() for key, value in state.items()}


def save_adapter(unet: UNet2DConditionModel, method: str, family: str, output_dir: Path) -> Path:
    """Save the UNet's adapter into `output_dir`; returns the file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    if method == "lora":
        return _save_lora(unet, family, config, output_dir)
    from safetensors.torch import save_file

    metadata = {
        METHOD_KEY: method,
        "family": family,
        "rank": str(config["r"]),
        "alpha": str(float(config["alpha"])),
        "target_modules": json.dumps(config["target_modules"]),
        "peft_config": json.dumps(config, default=_jsonable),
    }
    path = output_dir / LYCORIS_WEIGHT_NAME
    save_file(adapter_state_dict(unet), str(path), metadata=metadata)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value)
    return str(value)


def _save_lora(unet: UNet2DConditionModel, family: str, config: dict[str, Any], output_dir: Path) -> Path:
    """diffusers format; the peft config goes in `lora_adapter_metadata` so alpha != rank reloads right."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    layers = {key.removeprefix("unet."): value for key, value in adapter_state_dict(unet).items()}
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipeline_class.save_lora_weights(
        output_dir,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=config,
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    return output_dir / LORA_WEIGHT_NAME


def read_adapter_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_lycoris_into(unet: UNet2DConditionModel, path: Path) -> None:
    """Re-create the LoHa/LoKr adapter saved at `path` on `unet` and load its weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    metadata = read_adapter_metadata(path)
    config = adapter_config(
        metadata[METHOD_KEY], int(metadata["rank"]), float(metadata["alpha"]), json.loads(metadata["target_modules"])
    )
    unet.add_adapter(config)
    weights = {key.removeprefix("unet."): value for key, value in load_file(str(path)).items()}
    result = set_peft_model_state_dict(unet, weights)
    if result.unexpected_keys:
        raise ValueError(f"{path}: keys that match no adapter module: {result.unexpected_keys[:5]}")


def apply_adapter_file(pipe: Any, path: Path) -> None:
    """Load a LoRA (diffusers or kohya format) or a dreamflow LoHa/LoKr file into `pipe`."""
    path = Path(path)
    if read_adapter_metadata(path).get(METHOD_KEY) in ("loha", "lokr"):
        load_lycoris_into(pipe.unet, path)
        pipe.unet.to(device=pipe.device, dtype=pipe.unet.dtype)
        return
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
