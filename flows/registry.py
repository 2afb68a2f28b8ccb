"""The base-model registry: ``base_model_id`` -> family, source, resolution (SPEC §5)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

BUNDLED_REGISTRY = Path(__file__).with_name("base_models.yaml")

Family = Literal["sd15", "sd2", "sdxl"]


class ModelSource(BaseModel):
    """Where a base model's weights come from."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["builtin", "hub", "folder", "single_file"]
    ref: str = Field(description="Builtin name, hub id, folder path or checkpoint path.")


class BaseModelEntry(BaseModel):
    """One base model the service can train on."""

    model_config = ConfigDict(frozen=True)

    id: str
    family: Family
    source: ModelSource
    resolution: int = Field(gt=0)
    seconds_per_step: float = Field(0.5, gt=0)
    lora_learning_rate: float = Field(1e-4, gt=0, le=1.0)
    dreambooth_learning_rate: float = Field(2e-6, gt=0, le=1.0)
    class_images: int = Field(50, ge=0, description="Prior-preservation images for DreamBooth (0: none).")
    description: str = ""


class RegistryError(ValueError):
    """The registry file is missing or malformed."""


class UnknownBaseModel(LookupError):
    """A ``base_model_id`` the registry does not list."""


def _read_entries(path: Path) -> dict[str, BaseModelEntry]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return {key: BaseModelEntry(id=key, **value) for key, value in (raw.get("models") or {}).items()}
    except (OSError, yaml.YAMLError, ValidationError, TypeError) as exc:
        raise RegistryError(f"cannot read base-model registry {path}: {exc}") from exc


def load_registry(override: Path | None = None) -> dict[str, BaseModelEntry]:
    """The bundled entries, replaced or extended by those of ``override``."""
    entries = _read_entries(BUNDLED_REGISTRY)
    if override is not None:
        entries.update(_read_entries(override))
    return entries


def lookup(registry: dict[str, BaseModelEntry], base_model_id: str) -> BaseModelEntry:
    """The entry for ``base_model_id`` or :class:`UnknownBaseModel`."""
    try:
        return registry[base_model_id]
    except KeyError:
        known = ", ".join(sorted(registry))
        raise UnknownBaseModel(f"unknown base model {base_model_id!r}; known: {known}") from None
