"""The built-in `tiny` and `tiny-sdxl` base models: small, randomly initialised SD-1.x/SDXL-shaped pipelines.

It needs no download, is identical on every machine (seeded), and is what the tests, the sandbox
endpoints and the offline demo train on. Its training resolution is `TINY_RESOLUTION` pixels.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

TINY_RESOLUTION = 64
"""Training and sampling resolution of `tiny`, in pixels."""

TINY_SDXL_RESOLUTION = 64
"""Training and sampling resolution of `tiny-sdxl`, in pixels."""

_TIME_EMBED = 8

_HIDDEN = 32
# SDXL's second encoder is wider than its first (1280 against 768), and diffusers' single-file loader
# tells the two apart by width: the tiny twin's must differ too.
_HIDDEN_2 = 48
_MAX_TOKENS = 77
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"

# Seeding and diffusers' lazy imports are process-global: threads of one process take turns.
_BUILD_LOCK = threading.Lock()


def byte_level_alphabet() -> list[str]:
    """The 256 GPT-2 byte-level unicode characters, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = 0
    chars: dict[int, str] = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _tiny_vocab() -> dict[str, int]:
    tokens = byte_level_alphabet()
    tokens += [f"{t}</w>" for t in byte_level_alphabet()]
    tokens += [_BOS, _EOS]
    return {token: index for index, token in enumerate(tokens)}


def _build_tokenizer(folder: Path) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(_tiny_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=_MAX_TOKENS)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _build_text_encoder(
    vocab_size: int, eos_token_id: int, bos_token_id: int, with_projection: bool = False, hidden: int = _HIDDEN
) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_TOKENS,
        projection_dim=hidden,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=eos_token_id,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _build_unet(sdxl: bool = False) -> UNet2DConditionModel:
    """The tiny UNet; for SDXL it takes both encoders' hidden states and the "text_time" added embedding
    (pooled projection + 6 time ids of `_TIME_EMBED` channels each)."""
    from diffusers import UNet2DConditionModel

    extra: dict[str, object] = {}
    if sdxl:
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _TIME_EMBED,
            "projection_class_embeddings_input_dim": 6 * _TIME_EMBED + _HIDDEN_2,  # the pooled projection
        }
    return UNet2DConditionModel(
        **extra,
        sample_size=TINY_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_HIDDEN + _HIDDEN_2 if sdxl else _HIDDEN,  # SDXL: both encoders' states
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _build_vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
    )


def _build_scheduler() -> DDPMScheduler:
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _build_into(folder: Path, seed: int) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    tokenizer = _build_tokenizer(folder / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _build_text_encoder(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
        torch.manual_seed(seed)
        unet = _build_unet()
        torch.manual_seed(seed)
        vae = _build_vae()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def _build_sdxl_into(folder: Path, seed: int) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline

    tokenizer = _build_tokenizer(folder / "tokenizer")
    tokenizer_2 = _build_tokenizer(folder / "tokenizer_2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _build_text_encoder(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
        torch.manual_seed(seed + 1)
        text_encoder_2 = _build_text_encoder(
            len(tokenizer_2), tokenizer_2.eos_token_id, tokenizer_2.bos_token_id, with_projection=True,
            hidden=_HIDDEN_2,
        )
        torch.manual_seed(seed)
        unet = _build_unet(sdxl=True)
        torch.manual_seed(seed)
        vae = _build_vae()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_build_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_tiny_sdxl(dest: Path, seed: int = 0) -> Path:
    """Build the `tiny-sdxl` pipeline (two tiny CLIP encoders, "text_time" UNet) into `dest` once."""
    return _build_once(dest, seed, _build_sdxl_into)


def build_tiny_sd(dest: Path, seed: int = 0) -> Path:
    """Build the `tiny` pipeline into `dest` once (diffusers folder layout) and return `dest`.

    Safe to call concurrently: each caller builds into its own temporary folder beside `dest`
    and renames it into place; a caller that loses the race discards its copy.
    """
    return _build_once(dest, seed, _build_into)


def _build_once(dest: Path, seed: int, builder: Callable[[Path, int], None]) -> Path:
    dest = Path(dest)
    if (dest / "model_index.json").exists():
        return dest
    with _BUILD_LOCK:
        if not (dest / "model_index.json").exists():
            _build_beside(dest, seed, builder)
    return dest


def _build_beside(dest: Path, seed: int, builder: Callable[[Path, int], None]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        builder(staging, seed)
        _move_into_place(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, dest: Path) -> None:
    try:
        os.rename(staging, dest)
        logger.info("built tiny base model at %s", dest)
    except OSError:
        if not (dest / "model_index.json").exists():
            raise
        logger.info("tiny base model at %s was built by another process", dest)
