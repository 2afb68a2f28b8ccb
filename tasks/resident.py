"""Base-model weights kept in memory between jobs.

The warm runner loads the components of the models named by ``DREAMFLOW_RESIDENT_MODELS`` once,
before it forks flow runs; every fork then finds them already in its (copy-on-write) memory and
skips reading and building them. Outside the runner nothing is resident and every lookup misses,
so the loaders fall back to ``from_pretrained`` as before.

A component a training changes (the UNet it adds an adapter to) is *taken*: the fork owns it and
the next lookup in that process misses. Components a job only runs (VAE, text encoders,
tokenizers) are *borrowed* and stay for the job's later stages, such as its samples.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_components: dict[tuple[str, str, str], Any] = {}
_trained: dict[str, Any] = {}  # training id -> its trained UNet, at most one


def _key(pretrained: str, subfolder: str, dtype: torch.dtype | None) -> tuple[str, str, str]:
    return (str(pretrained), subfolder, str(dtype) if dtype is not None else "")


def take(pretrained: str, subfolder: str, dtype: torch.dtype | None = None) -> Any | None:
    """The resident component, handed over for good (later lookups miss), or None."""
    return _components.pop(_key(pretrained, subfolder, dtype), None)


def borrow(pretrained: str, subfolder: str, dtype: torch.dtype | None = None) -> Any | None:
    """The resident component, left resident for later stages of this job, or None. Callers only run it."""
    return _components.get(_key(pretrained, subfolder, dtype))


def keep(pretrained: str, subfolder: str, dtype: torch.dtype | None, component: Any) -> None:
    _components[_key(pretrained, subfolder, dtype)] = component


def hand_over_trained(training_id: str, unet: Any) -> None:
    """Keep the UNet a training just trained (adapter still unmerged) for that job's samples, so
    they skip loading the base UNet again and applying the saved adapter file. One at most: a
    newer training's replaces it, and a job that never samples leaves it for the process's end."""
    _trained.clear()
    _trained[training_id] = unet


def take_trained(training_id: str) -> Any | None:
    """The UNet ``training_id`` handed over in this process, or None (say, a rerun in another process)."""
    return _trained.pop(training_id, None)


def resident() -> list[tuple[str, str, str]]:
    """(model folder, component, dtype) of every resident component."""
    return sorted(_components)


def training_unet_dtype() -> torch.dtype:
    """The dtype an adapter training loads its frozen UNet in here: bf16 on CUDA, else float32."""
    import torch

    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_resident(pretrained: str, family: str) -> float:
    """Load one base model's UNet (in the adapter-training dtype), VAE, text encoders and tokenizers
    into memory, on the CPU; returns the seconds it took."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    started = time.perf_counter()
    unet_dtype = training_unet_dtype()
    keep(pretrained, "unet", unet_dtype,
         UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", dtype=unet_dtype))
    keep(pretrained, "vae", torch.float32, AutoencoderKL.from_pretrained(pretrained, subfolder="vae"))
    encoders = [("text_encoder", CLIPTextModel), ("tokenizer", CLIPTokenizer)]
    if family == "sdxl":
        encoders += [("text_encoder_2", CLIPTextModelWithProjection), ("tokenizer_2", CLIPTokenizer)]
    for subfolder, cls in encoders:
        component = cls.from_pretrained(pretrained, subfolder=subfolder)
        if subfolder.startswith("text_encoder"):
            component.requires_grad_(False)
            component.eval()
        keep(pretrained, subfolder, torch.float32 if subfolder.startswith("text_encoder") else None, component)
    return time.perf_counter() - started


def preload_models(model_ids: list[str]) -> None:
    """Make the named registry models resident (the warm runner, before it forks). A model that
    cannot be loaded is logged and skipped: jobs on it load it themselves, as without the runner."""
    from tasks.context import base_model, worker_settings, worker_store
    from tasks.models import resolve_pretrained

    try:
        for model_id in model_ids:
            try:
                entry = base_model(model_id)
                seconds = load_resident(resolve_pretrained(entry), entry.family)
            except Exception as exc:  # noqa: BLE001 - a model that will not load stays on disk
                log.warning("base model %s not kept in memory: %s", model_id, exc)
                continue
            log.info("base model %s resident in memory (loaded in %.1f s)", model_id, seconds)
    finally:  # forks read their own settings, from the environment their launcher gives them
        worker_settings.cache_clear()
        worker_store.cache_clear()
