"""Training data, computed once per job: VAE latent distributions and text embeddings.

SD 1.x/2.x condition on one CLIP text encoder's last hidden state; SDXL on the concatenated
penultimate hidden states of two encoders plus the second encoder's pooled projection and six
"added time ids" (original size, crop top-left, target size) per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.resident import borrow

if TYPE_CHECKING:
    import torch

    from tasks.engine_config import TrainConfig


@dataclass
class Dataset:
    """Per-image cached tensors on the training device."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    embeddings: torch.Tensor
    input_ids: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.latent_mean.shape[0])


ENCODE_BATCH = 8  # images per VAE encode: one call per image took twice as long on CPU


@dataclass(frozen=True)
class _Crop:
    original_size: tuple[int, int]
    top_left: tuple[int, int]


@dataclass(frozen=True)
class Pixels:
    """Images read and squared on the CPU (read_pixels), not yet encoded."""

    images: tuple[Path, ...]
    batch: torch.Tensor  # (N, 3, res, res) in [-1, 1]
    crops: tuple[_Crop, ...]


def build_dataset(config: TrainConfig, pixels: Pixels, captions: Sequence[str], device: torch.device) -> Dataset:
    """Encode every image and caption once; the VAE and text encoders are dropped afterwards."""
    import torch

    mean, std = encode_latents(config.pretrained_path, pixels.batch, device)
    embeddings, pooled, input_ids = encode_prompts(config.pretrained_path, config.family, list(captions), device)
    time_ids = None
    if config.family == "sdxl":
        target = (config.resolution, config.resolution)
        rows = [list(crop.original_size + crop.top_left + target) for crop in pixels.crops]
        time_ids = torch.tensor(rows, dtype=torch.float32, device=device)
    return Dataset(mean, std, embeddings, input_ids, pooled, time_ids)


def read_pixels(images: Sequence[Path], resolution: int) -> Pixels:
    """`images` read, squared to `resolution` and scaled to [-1, 1] (a float tensor (N, 3, res, res)),
    with each image's crop geometry: no device, no model."""
    import numpy as np
    import torch

    arrays, crops = [], []
    for path in images:
        image, crop = _square_image(Path(path), resolution)
        arrays.append(np.asarray(image, dtype=np.float32))
        crops.append(crop)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return Pixels(tuple(Path(image) for image in images), batch / 127.5 - 1.0, tuple(crops))


def _square_image(path: Path, resolution: int) -> tuple[Any, _Crop]:
    """Resize the short side to `resolution` and centre-crop, as SDXL's time ids describe it."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    square = resized.crop((left, top, left + resolution, top + resolution))
    return square, _Crop(original_size=(height, width), top_left=(top, left))


def encode_latents(pretrained_path: str, pixels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Scaled mean and std of each image's latent distribution (sampled afresh every step)."""
    import torch
    from diffusers import AutoencoderKL

    vae = borrow(pretrained_path, "vae", torch.float32) or AutoencoderKL.from_pretrained(pretrained_path, subfolder="vae")
    vae.to(device)
    vae.requires_grad_(False)
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    means, stds = [], []
    with torch.no_grad():
        for first in range(0, len(pixels), ENCODE_BATCH):
            dist = vae.encode(pixels[first:first + ENCODE_BATCH].to(device)).latent_dist
            means.append((dist.mean - shift) * scale)
            stds.append(dist.std * scale)
    del vae
    return torch.cat(means), torch.cat(stds)


def load_tokenizers(pretrained_path: str, family: str) -> list[Any]:
    from transformers import CLIPTokenizer

    names = ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"]
    return [borrow(pretrained_path, name) or CLIPTokenizer.from_pretrained(pretrained_path, subfolder=name)
            for name in names]


def load_text_encoders(pretrained_path: str, family: str) -> list[Any]:
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    first = borrow(pretrained_path, "text_encoder", torch.float32) or CLIPTextModel.from_pretrained(
        pretrained_path, subfolder="text_encoder"
    )
    if family != "sdxl":
        return [first]
    second = borrow(pretrained_path, "text_encoder_2", torch.float32) or CLIPTextModelWithProjection.from_pretrained(
        pretrained_path, subfolder="text_encoder_2"
    )
    return [first, second]


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return tokens.input_ids


def encode_prompts(
    pretrained_path: str, family: str, prompts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(embeddings, pooled or None, first tokenizer's input ids) for `prompts`."""
    import torch

    tokenizers = load_tokenizers(pretrained_path, family)
    encoders = [encoder.to(device).requires_grad_(False) for encoder in load_text_encoders(pretrained_path, family)]
    ids = [tokenize(tokenizer, prompts).to(device) for tokenizer in tokenizers]
    with torch.no_grad():
        if family != "sdxl":
            embeddings, pooled = encoders[0](ids[0])[0], None
        else:
            embeddings, pooled = sdxl_embeddings(encoders, ids)
    del encoders
    return embeddings, pooled, ids[0]


def sdxl_embeddings(encoders: list[Any], ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated penultimate hidden states of both encoders, and the second one's pooled output."""
    import torch

    hidden, pooled = [], None
    for encoder, input_ids in zip(encoders, ids):
        output = encoder(input_ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]  # CLIPTextModelWithProjection: text_embeds
    return torch.cat(hidden, dim=-1), pooled
