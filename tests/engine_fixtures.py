"""Fixtures shared by the engine tests (import them into a test module's namespace)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from tasks.engine_config import TrainConfig
from tasks.tiny_models import TINY_RESOLUTION, build_tiny_sd

PROMPT = "photo of sks person"
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Two shared cores: one torch thread avoids OpenMP spin-waits that slow these runs 2-3x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two photos of one subject (the skimage astronaut), one of them mirrored and not square."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    photo = Image.fromarray(data.astronaut())
    paths = [folder / "a.jpg", folder / "b.png"]
    photo.save(paths[0])
    photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((300, 200)).save(paths[1])
    return paths


def config_for(model: Path, **overrides: object) -> TrainConfig:
    options: dict[str, object] = {
        "pretrained_path": str(model),
        "resolution": TINY_RESOLUTION,
        "rank": 4,
        "alpha": 8.0,
        "learning_rate": 1e-2,
        "max_train_steps": 12,
        "seed": 0,
        "report_every": 4,
    }
    options.update(overrides)
    return TrainConfig(**options)


def stop_after(steps: int) -> Callable[[], bool]:
    """A `should_stop` that lets `steps` steps run and cancels the run at the next check."""
    checks: list[int] = []

    def should_stop() -> bool:
        checks.append(1)
        return len(checks) > steps

    return should_stop
