"""The LoRA training loop: diffusers + peft + accelerate, no Prefect.

The algorithm is that of diffusers' `examples/dreambooth/train_dreambooth_lora.py`: frozen
VAE, text encoder and UNet; LoRA adapters on the UNet's attention projections; noise-prediction
MSE (optionally min-SNR weighted). VAE latents and text embeddings are computed once before the
loop and cached; the VAE and text encoder are freed before the first step.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

ProgressCallback = Callable[[int, int, float], None]
StopCheck = Callable[[], bool]


class TrainingError(RuntimeError):
    """Base class of the errors the training loop raises on purpose."""


class TrainingCancelled(TrainingError):
    """`should_stop()` returned True; nothing was saved."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite."""


class LoraTrainConfig(BaseModel):
    """Options of one LoRA training run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pretrained_path: str = Field(description="Base model: a local diffusers folder or a Hugging Face hub id.")
    resolution: int = Field(gt=0, description="Square training resolution in pixels (512 for SD 1.x).")
    rank: int = Field(default=4, gt=0, description="LoRA rank (dimension of the low-rank update).")
    alpha: float | None = Field(
        default=None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. Defaults to rank."
    )
    learning_rate: float = Field(default=1e-4, gt=0, description="AdamW learning rate of the LoRA weights.")
    max_train_steps: int = Field(gt=0, description="Number of optimisation steps.")
    train_batch_size: int = Field(default=1, gt=0, description="Images per step.")
    seed: int = Field(description="Seed of LoRA initialisation, batch order, noise and timesteps.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="no", description="Precision of the frozen weights and the forward pass."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Trade compute for memory by recomputing UNet activations."
    )
    target_modules: tuple[str, ...] = Field(
        default=("to_q", "to_k", "to_v", "to_out.0"), description="UNet module names that get LoRA adapters."
    )
    lr_warmup_steps: int = Field(default=0, ge=0, description="Linear learning-rate warm-up steps.")
    report_every: int = Field(
        default=5, gt=0, description="Steps between loss reports (each report syncs the device)."
    )
    offset_noise: float = Field(default=0.0, ge=0, description="Offset-noise strength (0 disables it).")
    snr_gamma: float | None = Field(
        default=None, gt=0, description="Min-SNR weighting gamma (5.0 is usual); None disables it."
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient-norm clipping threshold.")

    @model_validator(mode="after")
    def _default_alpha_to_rank(self) -> LoraTrainConfig:
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        return self


class TrainResult(BaseModel):
    """What a finished training run produced."""

    model_config = ConfigDict(frozen=True)

    lora_file: Path = Field(description="The diffusers-format LoRA safetensors file.")
    rank: int = Field(description="LoRA rank.")
    alpha: float = Field(description="LoRA alpha.")
    steps: int = Field(description="Optimisation steps run.")
    final_loss: float = Field(description="Mean loss over the last report window.")
    losses: list[tuple[int, float]] = Field(description="(step, mean loss since the previous report).")
    seconds: float = Field(description="Wall time of the whole run, loading included.")


@dataclass
class _TrainingData:
    """Per-image cached tensors on the training device."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    text_embeddings: torch.Tensor


@dataclass
class _Session:
    accelerator: Accelerator
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    optimizer: Any
    lr_scheduler: Any
    data: _TrainingData
    generator: torch.Generator


def train_lora(
    config: LoraTrainConfig,
    images: Sequence[Path],
    captions: Sequence[str],
    output_dir: Path,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> TrainResult:
    """Train a LoRA on `images` (one caption each) and save it to `output_dir`."""
    if len(images) == 0 or len(images) != len(captions):
        raise ValueError(f"need one caption per image, got {len(images)} images and {len(captions)} captions")
    started = time.perf_counter()
    session = _start_session(config, images, captions)
    try:
        losses = _run_loop(session, config, on_progress, should_stop)
        lora_file = _save_lora(session, config, Path(output_dir))
    finally:
        _free(session)
    return TrainResult(
        lora_file=lora_file,
        rank=config.rank,
        alpha=float(config.alpha),
        steps=config.max_train_steps,
        final_loss=losses[-1][1],
        losses=losses,
        seconds=time.perf_counter() - started,
    )


def _start_session(config: LoraTrainConfig, images: Sequence[Path], captions: Sequence[str]) -> _Session:
    import torch
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler

    accelerator = _new_accelerator(config.mixed_precision)
    set_seed(config.seed)
    data = _prepare_data(config, images, captions, accelerator.device)
    unet = _load_unet_with_lora(config, _weight_dtype(config))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    lr_scheduler = _make_lr_scheduler(optimizer, config.lr_warmup_steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    noise_scheduler = DDPMScheduler.from_pretrained(config.pretrained_path, subfolder="scheduler")
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed)
    return _Session(accelerator, unet, noise_scheduler, optimizer, lr_scheduler, data, generator)


def _new_accelerator(mixed_precision: str) -> Accelerator:
    """An Accelerator with this run's precision.

    accelerate keeps its state in a process-wide singleton that refuses a second, different
    `mixed_precision`; a worker runs many trainings, so each run starts from a fresh state.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision)


def _weight_dtype(config: LoraTrainConfig) -> torch.dtype:
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]


def _make_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    import torch

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _load_unet_with_lora(config: LoraTrainConfig, dtype: torch.dtype) -> UNet2DConditionModel:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(config.pretrained_path, subfolder="unet", dtype=dtype)
    unet.requires_grad_(False)
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        init_lora_weights="gaussian",
        target_modules=list(config.target_modules),
    )
    unet.add_adapter(lora_config)
    cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay fp32
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def _prepare_data(
    config: LoraTrainConfig, images: Sequence[Path], captions: Sequence[str], device: torch.device
) -> _TrainingData:
    """Encode every image and caption once, then free the VAE and the text encoder."""
    pixels = _load_pixels(images, config.resolution)
    mean, std = _encode_latents(config.pretrained_path, pixels, device)
    embeddings = _encode_captions(config.pretrained_path, list(captions), device)
    gc.collect()
    return _TrainingData(latent_mean=mean, latent_std=std, text_embeddings=embeddings)


def _load_pixels(images: Sequence[Path], resolution: int) -> torch.Tensor:
    """Images as a float tensor (N, 3, resolution, resolution) in [-1, 1]."""
    import numpy as np
    import torch

    arrays = [np.asarray(_square_image(Path(path), resolution), dtype=np.float32) for path in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch / 127.5 - 1.0


def _square_image(path: Path, resolution: int) -> Any:
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    return ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.BICUBIC)


def _encode_latents(pretrained_path: str, pixels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Scaled mean and std of each image's latent distribution (sampled afresh every step)."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pretrained_path, subfolder="vae").to(device)
    vae.requires_grad_(False)
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    means, stds = [], []
    with torch.no_grad():
        for image in pixels:
            dist = vae.encode(image.unsqueeze(0).to(device)).latent_dist
            means.append((dist.mean - shift) * scale)
            stds.append(dist.std * scale)
    del vae
    return torch.cat(means), torch.cat(stds)


def _encode_captions(pretrained_path: str, captions: list[str], device: torch.device) -> torch.Tensor:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(pretrained_path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pretrained_path, subfolder="text_encoder").to(device)
    tokens = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        embeddings = text_encoder(tokens.input_ids.to(device))[0]
    del text_encoder
    return embeddings


def _run_loop(
    session: _Session,
    config: LoraTrainConfig,
    on_progress: ProgressCallback | None,
    should_stop: StopCheck | None,
) -> list[tuple[int, float]]:
    import torch

    total = config.max_train_steps
    losses: list[tuple[int, float]] = []
    window = torch.zeros((), device=session.accelerator.device)
    window_steps = 0
    for step in range(1, total + 1):
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"training cancelled at step {step - 1} of {total}")
        window += _optimisation_step(session, config).detach().float()
        window_steps += 1
        if step % config.report_every == 0 or step == total:
            losses.append((step, _report(window / window_steps, step, total, on_progress)))
            window.zero_()
            window_steps = 0
    return losses


def _report(mean_loss: torch.Tensor, step: int, total: int, on_progress: ProgressCallback | None) -> float:
    value = float(mean_loss.item())
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"loss became {value} by step {step} of {total}; lower the learning rate or use fp32/bf16"
        )
    logger.info("step %d/%d loss %.5f", step, total, value)
    if on_progress is not None:
        on_progress(step, total, value)
    return value


def _optimisation_step(session: _Session, config: LoraTrainConfig) -> torch.Tensor:
    accelerator = session.accelerator
    loss = _compute_loss(session, config)
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        params = [p for p in session.unet.parameters() if p.requires_grad]
        accelerator.clip_grad_norm_(params, config.max_grad_norm)
    session.optimizer.step()
    session.lr_scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    return loss


def _compute_loss(session: _Session, config: LoraTrainConfig) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    data, gen = session.data, session.generator
    device = data.latent_mean.device
    count = data.latent_mean.shape[0]
    index = torch.randint(0, count, (config.train_batch_size,), generator=gen, device=device)
    mean, std = data.latent_mean[index], data.latent_std[index]
    latents = mean + std * torch.randn(mean.shape, generator=gen, device=device)
    noise = _sample_noise(latents, config.offset_noise, gen)
    scheduler = session.noise_scheduler
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=gen, device=device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = _target(scheduler, latents, noise, timesteps)
    dtype = _weight_dtype(config)
    prediction = session.unet(
        noisy.to(dtype), timesteps, encoder_hidden_states=data.text_embeddings[index].to(dtype), return_dict=False
    )[0]
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.snr_gamma is not None:
        per_sample = per_sample * _min_snr_weights(scheduler, timesteps, config.snr_gamma)
    return per_sample.mean()


def _sample_noise(latents: torch.Tensor, offset: float, gen: torch.Generator) -> torch.Tensor:
    import torch

    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    if offset > 0:
        batch, channels = latents.shape[:2]
        noise = noise + offset * torch.randn((batch, channels, 1, 1), generator=gen, device=latents.device)
    return noise


def _target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")


def _min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), per sample."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def _save_lora(session: _Session, config: LoraTrainConfig, output_dir: Path) -> Path:
    """Save the UNet LoRA in diffusers format, with its peft config as adapter metadata.

    The keys are peft's (`unet.<module>.lora_A.weight` / `lora_B.weight`), which
    `load_lora_weights` reads directly; the metadata (`LoraConfig.to_dict()`, stored by diffusers
    under the safetensors header key `lora_adapter_metadata` with a `unet.` prefix) carries
    `lora_alpha`, so alpha != rank reloads with the right scale.
    """
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet = session.accelerator.unwrap_model(session.unet)
    layers = {key: value.detach().float().cpu().contiguous() for key, value in get_peft_model_state_dict(unet).items()}
    metadata = unet.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    output_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        output_dir,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=metadata,
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    return output_dir / LORA_WEIGHT_NAME


def _free(session: _Session) -> None:
    import torch

    session.accelerator.free_memory()
    session.unet = session.optimizer = session.lr_scheduler = None  # type: ignore[assignment]
    session.data = None  # type: ignore[assignment]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
