"""Training checkpoints in the object store, written so a half-written one is never picked.

Layout under a prefix (e.g. `trainings/<id>/checkpoints`):

    step-00000010/trainable.safetensors   every trainable tensor (adapter or whole UNet / text encoder)
    step-00000010/state.pt                optimizer, lr scheduler, RNG states, step, loss history
    latest.json                           {"step": 10, "folder": "step-00000010", "inputs": "<sha256>"},
                                          written last

A crash between the files and the pointer leaves the previous checkpoint in force. Older step
folders are deleted once the pointer has moved on. ``inputs`` identifies what the run trained on
(:func:`inputs_digest`): a checkpoint made from other images or settings is not resumed from.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from flows.store import ObjectStore

POINTER = "latest.json"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"


@dataclass
class Checkpoint:
    """One restorable training state."""

    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    rng: dict[str, Any]
    losses: list[tuple[int, float]] = field(default_factory=list)
    inputs: str | None = None  # inputs_digest() of the run that made it (as loaded)


@dataclass(frozen=True)
class CheckpointStore:
    """Where one training run keeps its checkpoints."""

    store: ObjectStore
    prefix: str
    inputs: str | None = None  # inputs_digest() of what the run trains on, written with each checkpoint

    def key(self, name: str) -> str:
        return f"{self.prefix.rstrip('/')}/{name}"


def inputs_digest(settings_json: str, images: Sequence[Path], captions: Sequence[str]) -> str:
    """sha256 over a training's settings (JSON), its images' bytes and their captions, in order."""
    digest = hashlib.sha256(settings_json.encode())
    for image, caption in zip(images, captions, strict=True):
        digest.update(hashlib.sha256(Path(image).read_bytes()).digest())
        digest.update(hashlib.sha256(caption.encode()).digest())
    return digest.hexdigest()


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random state the loop draws from: torch (CPU, CUDA), numpy, python, the loop's generator."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": _python_state_to_list(random.getstate()),
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save_checkpoint(target: CheckpointStore, checkpoint: Checkpoint) -> str:
    """Upload `checkpoint`, then move the pointer to it, then drop older ones; returns its folder key."""
    import torch
    from safetensors.torch import save_file

    folder = f"step-{checkpoint.step:08d}"
    with tempfile.TemporaryDirectory(prefix="dreamflow-ckpt-") as tmp:
        weights, state = Path(tmp) / WEIGHTS, Path(tmp) / STATE
        tensors = {name: value.detach().cpu().contiguous() for name, value in checkpoint.trainable.items()}
        save_file(tensors, str(weights))
        torch.save(
            {
                "step": checkpoint.step,
                "optimizer": checkpoint.optimizer,
                "lr_scheduler": checkpoint.lr_scheduler,
                "rng": checkpoint.rng,
                "losses": [list(item) for item in checkpoint.losses],
            },
            state,
        )
        target.store.put_file(target.key(f"{folder}/{WEIGHTS}"), weights)
        target.store.put_file(target.key(f"{folder}/{STATE}"), state)
    pointer = json.dumps({"step": checkpoint.step, "folder": folder, "inputs": target.inputs}).encode()
    target.store.put_bytes(target.key(POINTER), pointer, content_type="application/json")
    _prune(target, keep=folder)
    return target.key(folder)


def _prune(target: CheckpointStore, keep: str) -> None:
    for key in target.store.list(target.key("")):
        name = key[len(target.key("")) :].split("/", 1)[0]
        if name.startswith("step-") and name != keep:
            target.store.delete_prefix(target.key(name) + "/")


def load_latest(target: CheckpointStore) -> Checkpoint | None:
    """The checkpoint `latest.json` points to, or None when there is none yet."""
    import torch
    from safetensors.torch import load_file

    if not target.store.exists(target.key(POINTER)):
        return None
    pointer = json.loads(target.store.get_bytes(target.key(POINTER)))
    folder = pointer["folder"]
    with tempfile.TemporaryDirectory(prefix="dreamflow-ckpt-") as tmp:
        weights = target.store.get_file(target.key(f"{folder}/{WEIGHTS}"), Path(tmp) / WEIGHTS)
        state_file = target.store.get_file(target.key(f"{folder}/{STATE}"), Path(tmp) / STATE)
        trainable = load_file(str(weights))
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    return Checkpoint(
        step=int(state["step"]),
        trainable=trainable,
        optimizer=state["optimizer"],
        lr_scheduler=state["lr_scheduler"],
        rng=state["rng"],
        losses=[(int(step), float(loss)) for step, loss in state["losses"]],
        inputs=pointer.get("inputs"),
    )
