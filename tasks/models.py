"""Turn a registry entry into something diffusers' ``from_pretrained`` accepts."""

from __future__ import annotations

from flows.registry import BaseModelEntry
from tasks.context import worker_settings


class UnsupportedSource(ValueError):
    """A registry source kind this code path cannot load yet."""


def resolve_pretrained(entry: BaseModelEntry) -> str:
    """A local diffusers folder or hub id for ``entry`` (building builtin models on first use)."""
    kind, ref = entry.source.kind, entry.source.ref
    if kind == "builtin":
        from tasks.tiny_models import build_tiny_sd, build_tiny_sdxl

        builders = {"tiny": build_tiny_sd, "tiny-sdxl": build_tiny_sdxl}
        if ref not in builders:
            raise UnsupportedSource(f"base model {entry.id!r}: no builtin model named {ref!r}")
        return str(builders[ref](worker_settings().resolved_data_dir / "models" / ref))
    if kind in ("hub", "folder"):
        return ref
    raise UnsupportedSource(f"base model {entry.id!r}: source kind {kind!r} is not supported for training yet")
