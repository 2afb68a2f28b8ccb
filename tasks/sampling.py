"""Sample images from a base model (SD 1.x/2.x or SDXL), with or without a trained adapter."""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL.Image import Image


def pipeline_family(model_dir: str, family: str | None = None) -> str:
    """`family` if given, else "sdxl" when the folder's model_index.json names an XL pipeline, else "sd15"."""
    if family is not None:
        return family
    index = Path(model_dir) / "model_index.json"
    if index.is_file() and "XL" in json.loads(index.read_text()).get("_class_name", ""):
        return "sdxl"
    return "sd15"


def load_pipeline(
    model_dir: str, lora_file: Path | None = None, family: str | None = None, unet: Any | None = None
) -> StableDiffusionPipeline:
    """The pipeline (float32 on CPU, float16 on CUDA), with the adapter at `lora_file` loaded if given.

    `lora_file` may be a diffusers or kohya LoRA or a dreamflow LoHa/LoKr file. `unet`, when
    given, is used instead of `model_dir`'s (a trained one, its adapter already in it).
    """
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from tasks.adapters import apply_adapter_file

    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    sdxl = pipeline_family(model_dir, family) == "sdxl"
    components = resident_components(model_dir, dtype, sdxl)
    if unet is not None:
        components["unet"] = unet.to(dtype=dtype)
    if sdxl:
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=dtype, **components)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            model_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False, **components
        )
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to("cuda" if cuda else "cpu")
    if lora_file is not None:
        apply_adapter_file(pipe, Path(lora_file))
    return pipe


def resident_components(model_dir: str, dtype: torch.dtype, sdxl: bool) -> dict[str, Any]:
    """The VAE, text encoders and tokenizers of `model_dir` that are resident in memory in `dtype`
    (see tasks/resident.py), taken: sampling is a job's last use of them."""
    from tasks.resident import take

    names = ["vae", "text_encoder", "tokenizer"] + (["text_encoder_2", "tokenizer_2"] if sdxl else [])
    found = {name: take(model_dir, name, None if name.startswith("tokenizer") else dtype) for name in names}
    return {name: component for name, component in found.items() if component is not None}


def merge_adapters(pipe: StableDiffusionPipeline) -> None:
    """Fold the adapters loaded into `pipe` into its weights. Unmerged, every adapted layer computes
    its adapter again at each denoising step (a quarter of the tiny model's sampling time on CPU);
    merged, sampling runs at the base model's speed."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for module in component.modules():
                if isinstance(module, BaseTunerLayer) and not module.merged:
                    module.merge()


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
    family: str | None = None,
    unet: Any | None = None,
) -> list[Path]:
    """Generate `count` PNG samples into `dest_dir` and return their paths.

    `model_dir` is a base model (with `lora_file`) or a trained dreambooth pipeline folder (no
    `lora_file`); `family` defaults to what its model_index.json says. `unet` is the trained UNet
    a training handed over in this process (its adapter the one in `lora_file`, which is then not
    read).
    """
    from tasks.context import run_logger

    started = time.perf_counter()
    pipe = load_pipeline(model_dir, None if unet is not None else lora_file, family, unet)
    try:
        merge_adapters(pipe)
        loaded = time.perf_counter()
        images = render(pipe, prompt, negative_prompt, count, seed, resolution, steps)
        rendered = time.perf_counter()
    finally:
        del pipe
        _release_memory()
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = dest_dir / f"sample_{index:02d}.png"
        image.save(path)
        paths.append(path)
    run_logger().info("%d samples: pipeline loaded in %.2f s%s, rendered in %.2f s (%d steps), saved in %.2f s",
                      len(paths), loaded - started, " (the UNet the training handed over)" if unet is not None else "",
                      rendered - loaded, steps, time.perf_counter() - rendered)
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
    """Mean absolute pixel difference (0..255) between base and base+adapter images, same seed."""
    from tasks.adapters import apply_adapter_file

    pipe = load_pipeline(model_dir)
    try:
        base = render(pipe, prompt, None, 1, seed, resolution, steps)[0]
        apply_adapter_file(pipe, Path(lora_file))
        tuned = render(pipe, prompt, None, 1, seed, resolution, steps)[0]
    finally:
        del pipe
        _release_memory()
    return _mean_abs_difference(base, tuned)


def pipeline_output_difference(
    base_dir: str, tuned_dir: str, prompt: str, seed: int, resolution: int, steps: int = 10
) -> float:
    """Mean absolute pixel difference (0..255) between two pipelines' images (e.g. base vs dreambooth)."""
    images = []
    for model_dir in (base_dir, tuned_dir):
        pipe = load_pipeline(model_dir)
        try:
            images.append(render(pipe, prompt, None, 1, seed, resolution, steps)[0])
        finally:
            del pipe
            _release_memory()
    return _mean_abs_difference(*images)


def _mean_abs_difference(first: Image, second: Image) -> float:
    import numpy as np

    difference = np.abs(np.asarray(first, dtype=np.float32) - np.asarray(second, dtype=np.float32))
    return float(difference.mean())


def _release_memory() -> None:
    """Give a dropped pipeline's GPU memory back at once. On CPU, reference counting frees most of it
    and Python's collector the rest in its time: a forced full collection there cost 0.35 s."""
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
