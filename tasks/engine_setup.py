"""Building one training session: accelerator, trainable UNet (adapter or full), optimizer, schedules."""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.adapters import adapter_config
from tasks.engine_config import ADAPTER_METHODS, TrainConfig
from tasks.engine_data import Dataset, Pixels, build_dataset, read_pixels
from tasks.master_weights import MasterWeights
from tasks.resident import take

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything the loop touches."""

    accelerator: Accelerator
    unet: UNet2DConditionModel
    text_encoder: Any | None
    noise_scheduler: DDPMScheduler
    optimizer: Any
    lr_scheduler: Any
    instance: Dataset
    prior: Dataset | None
    generator: torch.Generator
    input_dtype: torch.dtype
    cuda_graphs: bool = False
    master: MasterWeights | None = None
    """The adapter's fp32 master weights when the step computes with bf16 copies (see use_master_weights)."""


@dataclass
class Prepared:
    """The part of a session that needs no device: the training images read and the trainable
    models built on the CPU. A job builds it while it waits for its GPU slot (tasks/train.py)."""

    config: TrainConfig
    pixels: Pixels
    unet: UNet2DConditionModel
    text_encoder: Any | None


def prepare_session(config: TrainConfig, images: Sequence[Path]) -> Prepared:
    """Seed every generator with `config.seed`, read `images` and build the trainable UNet (and text
    encoder) on the CPU. The adapter's initial weights are drawn here, right after the seed, so a
    training starts from the same weights whenever this runs; the loop draws only from its own
    generator."""
    from accelerate.utils import set_seed

    if len(images) == 0:
        raise ValueError("no images to train on")
    set_seed(config.seed)
    pixels = read_pixels(images, config.resolution)
    return Prepared(config, pixels, load_trainable_unet(config), load_trainable_text_encoder(config))


def start_session(
    config: TrainConfig,
    images: Sequence[Path],
    captions: Sequence[str],
    class_images: Sequence[Path] | None,
    prepared: Prepared | None = None,
) -> Session:
    """The session on the training device; `prepared` (for these images and config) saves building
    its part again."""
    import torch
    from diffusers import DDPMScheduler

    if prepared is None:
        prepared = prepare_session(config, images)
    elif prepared.config != config or prepared.pixels.images != tuple(Path(image) for image in images):
        raise ValueError("prepared for another training: prepare_session with this config and these images")
    accelerator = new_accelerator(config.mixed_precision)
    device = accelerator.device
    instance = build_dataset(config, prepared.pixels, captions, device)
    prior = None
    if class_images:
        class_pixels = read_pixels(class_images, config.resolution)
        prior = build_dataset(config, class_pixels, [config.class_prompt or ""] * len(class_images), device)
    gc.collect()
    unet, text_encoder = prepared.unet, prepared.text_encoder
    unet.to(device)  # the optimizer sees the weights where they train (fused AdamW on CUDA)
    if text_encoder is not None:
        text_encoder.to(device)
    graphs_off = cuda_graphs_off(config, accelerator, text_encoder)
    master = MasterWeights(unet) if use_master_weights(config, graphs_off) else None
    logger.info("training step: %s%s", f"eager ({graphs_off})" if graphs_off else "CUDA graph",
                ", bf16 compute with fp32 master weights" if master is not None else "")
    if not graphs_off:
        # cuDNN's own layout: convolutions skip a transpose in and out (SD 1.5 LoRA step 28.5 -> 25.1 ms, H100).
        unet.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, unet, text_encoder, capturable=not graphs_off,
                               unet_params=master.masters if master is not None else None)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    if config.compile_unet:
        # On CUDA, with CUDA graphs: an SD 1.5 LoRA step 130 -> 21.6 ms on an H100, after ~140 s compiling.
        unet = torch.compile(unet, mode="reduce-overhead" if device.type == "cuda" else "default")
    if master is not None:  # the UNet stays out: accelerate would run its forward under autocast
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    elif text_encoder is not None:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    noise_scheduler = DDPMScheduler.from_pretrained(config.pretrained_path, subfolder="scheduler")
    seed = config.seed + accelerator.process_index  # each process draws different batches
    generator = torch.Generator(device=device).manual_seed(seed)
    input_dtype = weight_dtype(config.mixed_precision) if config.method in ADAPTER_METHODS else torch.float32
    return Session(
        accelerator, unet, text_encoder, noise_scheduler, optimizer, lr_scheduler, instance, prior, generator,
        input_dtype, cuda_graphs=not graphs_off, master=master,
    )


def use_master_weights(config: TrainConfig, graphs_off: str | None) -> bool:
    """Whether the adapter trains as bf16 weights with fp32 masters (tasks/master_weights.py): in a
    bf16 adapter run whose step is a CUDA graph. Elsewhere the step keeps autocast: an eager step
    waits on kernel launches, not on the casts, and on a CPU bf16 runs slower than fp32."""
    return graphs_off is None and config.method in ADAPTER_METHODS and config.mixed_precision == "bf16"


def cuda_graphs_off(config: TrainConfig, accelerator: Accelerator, text_encoder: Any | None) -> str | None:
    """Why this run's optimisation step cannot be one CUDA graph, or None when it can."""
    import torch

    reasons = [
        (not config.cuda_graphs, "cuda_graphs is off"),
        (accelerator.device.type != "cuda", "no CUDA device"),
        (accelerator.num_processes > 1, "several processes"),
        (config.compile_unet, "compile_unet brings CUDA graphs of its own"),
        (text_encoder is not None, "the text encoder trains for some steps"),
        (config.gradient_checkpointing, "gradient checkpointing"),
        (config.mixed_precision == "fp16", "fp16's gradient scaler decides on the host"),
        (_adamw_class(config.use_8bit_adam) is not torch.optim.AdamW, "8-bit AdamW"),
    ]
    return next((reason for off, reason in reasons if off), None)


def new_accelerator(mixed_precision: str) -> Accelerator:
    """An Accelerator with this run's precision.

    accelerate keeps its state in a process-wide singleton that refuses a second, different
    `mixed_precision`; a worker runs many trainings, so each run starts from a fresh state.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def load_trainable_unet(config: TrainConfig) -> UNet2DConditionModel:
    """Adapters: frozen UNet in the mixed-precision dtype + fp32 adapter. Dreambooth: whole fp32 UNet."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params

    adapter = config.method in ADAPTER_METHODS
    dtype = weight_dtype(config.mixed_precision) if adapter else torch.float32
    unet = take(config.pretrained_path, "unet", dtype) or UNet2DConditionModel.from_pretrained(
        config.pretrained_path, subfolder="unet", dtype=dtype
    )
    if adapter:
        unet.requires_grad_(False)
        unet.add_adapter(adapter_config(config.method, config.rank, float(config.alpha), list(config.target_modules)))
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.requires_grad_(True)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def load_trainable_text_encoder(config: TrainConfig) -> Any | None:
    """The fp32 text encoder when it trains for some steps (dreambooth, SD 1.x/2.x), else None."""
    if config.text_encoder_steps == 0:
        return None
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(config.pretrained_path, subfolder="text_encoder")
    encoder.requires_grad_(True)
    encoder.train()
    return encoder


def make_optimizer(
    config: TrainConfig, unet: Any, text_encoder: Any | None, capturable: bool = False,
    unet_params: list[Any] | None = None,
) -> Any:
    """AdamW (8-bit when bitsandbytes and CUDA allow it) with one group per model and learning rate.

    `capturable`: the fused AdamW keeps its step count on the device, so a CUDA graph can hold its update.
    `unet_params`: what it steps for the UNet (master weights) instead of its trainable parameters.
    """
    import torch

    if unet_params is None:
        unet_params = [p for p in unet.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": config.learning_rate}]
    if text_encoder is not None:
        groups.append({"params": list(text_encoder.parameters()), "lr": config.text_encoder_learning_rate})
    optimizer_class = _adamw_class(config.use_8bit_adam)
    devices = {p.device.type for group in groups for p in group["params"]}
    if optimizer_class is torch.optim.AdamW and devices <= {"cuda", "cpu"} and len(devices) == 1:
        # One fused kernel for the whole update instead of a dozen ops per tensor: the same AdamW
        # arithmetic; on the tiny CPU benchmark the step went from ~6 ms to ~1.6 ms.
        return optimizer_class(groups, lr=config.learning_rate, fused=True, capturable=capturable)
    return optimizer_class(groups, lr=config.learning_rate)


def _adamw_class(want_8bit: bool) -> Any:
    import torch

    if want_8bit and torch.cuda.is_available():
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]

            return bnb.optim.AdamW8bit
        except ImportError:
            logger.info("bitsandbytes is not installed; using torch AdamW")
    return torch.optim.AdamW


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier after `step` scheduler steps: linear warm-up, then constant or cosine."""
    warmup = config.lr_warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if config.lr_scheduler == "constant":
        return 1.0
    span = max(1, config.max_train_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(optimizer: Any, config: TrainConfig) -> Any:
    import functools

    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, config=config))


def named_trainable(session: Session) -> dict[str, torch.Tensor]:
    """Every trainable tensor by a stable name (`unet.` / `text_encoder.` prefixes)."""
    unwrap = session.accelerator.unwrap_model
    named = {f"unet.{n}": p for n, p in unwrap(session.unet).named_parameters() if p.requires_grad}
    if session.master is not None:  # the weights the optimizer steps, in fp32
        named = {name: session.master.master_of(param) for name, param in named.items()}
    if session.text_encoder is not None:
        named.update({f"text_encoder.{n}": p for n, p in unwrap(session.text_encoder).named_parameters()})
    return named
