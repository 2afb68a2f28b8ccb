"""Sample images from a base model, with or without a trained LoRA."""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from PIL.Image import Image

logger = logging.getLogger(__name__)


def load_pipeline(model_dir: str, lora_file: Path | None = None) -> StableDiffusionPipeline:
    """The base pipeline (float32 on CPU, float16 on CUDA), with `lora_file` loaded if given."""
    import torch
    from diffusers import StableDiffusionPipeline

    cuda = torch.cuda.is_available()
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir,
        dtype=torch.float16 if cuda else torch.float32,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if lora_file is not None:
        lora_file = Path(lora_file)
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    return pipe.to("cuda" if cuda else "cpu")


def render(
    pipe: StableDiffusionPipeline,
    prompt: str,
    negative_prompt: str | None,
    count: int,
    seed: int,
    resolution: int,
    steps: int,
) -> list[Image]:
    """`count` images for one prompt from a generator seeded with `seed`."""
    import torch

    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    output = pipe(
        prompt,
        negative_prompt=negative_prompt,
        num_images_per_prompt=count,
        num_inference_steps=steps,
        height=resolution,
        width=resolution,
        generator=generator,
    )
    return list(output.images)


def generate_samples(
    model_dir: str,
    lora_file: Path | None,
    prompt: str,
    negative_prompt: str | None,
    count: int,
    seed: int,
    resolution: int,
    dest_dir: Path,
    steps: int = 20,
) -> list[Path]:
    """Generate `count` PNG samples into `dest_dir` and return their paths."""
    pipe = load_pipeline(model_dir, lora_file)
    try:
        images = render(pipe, prompt, negative_prompt, count, seed, resolution, steps)
    finally:
        del pipe
        _release_memory()
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = dest_dir / f"sample_{index:02d}.png"
        image.save(path)
        paths.append(path)
    logger.info("wrote %d samples to %s", len(paths), dest_dir)
    return paths


def make_grid(paths: Sequence[Path], dest: Path) -> Path:
    """Tile the images at `paths` into one near-square PNG grid at `dest`."""
    from PIL import Image

    if not paths:
        raise ValueError("make_grid needs at least one image")
    images = [_open_rgb(path) for path in paths]
    width, height = images[0].size
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image.resize((width, height)), ((index % columns) * width, (index // columns) * height))
    dest.parent.mkdir(parents=True, exist_ok=True)
    grid.save(dest, format="PNG")
    return dest


def _open_rgb(path: Path) -> Image:
    from PIL import Image

    with Image.open(path) as opened:
        return opened.convert("RGB")


def lora_output_difference(
    model_dir: str, lora_file: Path, prompt: str, seed: int, resolution: int, steps: int = 10
) -> float:
    """Mean absolute pixel difference (0..255) between base and base+LoRA images, same seed."""
    import numpy as np

    pipe = load_pipeline(model_dir)
    try:
        base = render(pipe, prompt, None, 1, seed, resolution, steps)[0]
        pipe.load_lora_weights(str(Path(lora_file).parent), weight_name=Path(lora_file).name)
        tuned = render(pipe, prompt, None, 1, seed, resolution, steps)[0]
    finally:
        del pipe
        _release_memory()
    difference = np.abs(np.asarray(base, dtype=np.float32) - np.asarray(tuned, dtype=np.float32))
    return float(difference.mean())


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
