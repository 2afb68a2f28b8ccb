"""Turn a registry entry into something diffusers' ``from_pretrained`` accepts."""

from __future__ import annotations

from pathlib import Path

from flows.registry import BaseModelEntry
from tasks.context import worker_settings

MODEL_INDEX = "model_index.json"  # every diffusers pipeline folder on the hub has one


class UnsupportedSource(ValueError):
    """A registry source kind this code path cannot load yet."""


class ModelUnavailable(RuntimeError):
    """The base model's weights cannot be read on this worker."""


def resolve_pretrained(entry: BaseModelEntry) -> str:
    """A local diffusers folder or hub id for ``entry`` (building builtin models on first use)."""
    kind, ref = entry.source.kind, entry.source.ref
    if kind == "builtin":
        from tasks.tiny_models import build_tiny_sd, build_tiny_sdxl

        builders = {"tiny": build_tiny_sd, "tiny-sdxl": build_tiny_sdxl}
        if ref not in builders:
            raise UnsupportedSource(f"base model {entry.id!r}: no builtin model named {ref!r}")
        return str(builders[ref](worker_settings().resolved_data_dir / "models" / ref))
    if kind == "hub":
        check_hub_model(entry)
        return ref
    if kind == "folder":
        if not Path(ref).is_dir():
            raise ModelUnavailable(f"base model {entry.id!r}: its folder {ref} does not exist on this worker")
        return ref
    raise UnsupportedSource(f"base model {entry.id!r}: source kind {kind!r} is not supported for training yet")


def check_hub_model(entry: BaseModelEntry) -> None:
    """With the hub switched off (``HF_HUB_OFFLINE``), a hub model must be in the local cache already;
    :class:`ModelUnavailable` says so in words (``from_pretrained`` would fail on a missing config.json)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return
    if isinstance(try_to_load_from_cache(entry.source.ref, MODEL_INDEX), str):
        return
    raise ModelUnavailable(
        f"base model {entry.id!r} ({entry.source.ref} on the Hugging Face hub) is not in this worker's "
        f"model cache ({constants.HF_HUB_CACHE}) and the hub is switched off (HF_HUB_OFFLINE=1): download it "
        "once where the hub can be reached, let the worker reach the hub, or point the registry at a local folder"
    )
