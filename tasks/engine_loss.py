"""The loss of one training micro-batch, as diffusers' DreamBooth scripts compute it.

Latents are drawn from the cached VAE posteriors (mean + std x noise), noised at random timesteps
and predicted by the UNet; the target is the noise (epsilon) or the velocity (v-prediction).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tasks.engine_config import TrainConfig
    from tasks.engine_data import Dataset
    from tasks.engine_setup import Session


def _draw(dataset: Dataset, count: int, gen: torch.Generator) -> dict[str, Any]:
    import torch

    device = dataset.latent_mean.device
    index = torch.randint(0, len(dataset), (count,), generator=gen, device=device)
    mean, std = dataset.latent_mean[index], dataset.latent_std[index]
    batch: dict[str, Any] = {
        "latents": mean + std * torch.randn(mean.shape, generator=gen, device=device),
        "embeddings": dataset.embeddings[index],
        "input_ids": dataset.input_ids[index],
    }
    if dataset.pooled is not None:
        batch["pooled"], batch["time_ids"] = dataset.pooled[index], dataset.time_ids[index]
    return batch


def _merge(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {key: torch.cat([first[key], second[key]]) for key in first}


def compute_loss(session: Session, config: TrainConfig) -> torch.Tensor:
    """One micro-batch's loss: noise-prediction MSE on drawn latents (min-SNR weighted when asked),
    plus `prior_loss_weight` x the same on class images."""
    import torch
    import torch.nn.functional as F

    gen, count = session.generator, config.train_batch_size
    batch = _draw(session.instance, count, gen)
    if session.prior is not None:
        batch = _merge(batch, _draw(session.prior, count, gen))
    latents = batch["latents"]
    noise = _sample_noise(latents, config.offset_noise, gen)
    scheduler = session.noise_scheduler
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen, device=latents.device
    ).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = _predict(session, batch, noisy, timesteps)
    target = _target(scheduler, latents, noise, timesteps)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.snr_gamma is not None:
        per_sample = per_sample * _min_snr_weights(scheduler, timesteps, config.snr_gamma)
    if session.prior is None:
        return per_sample.mean()
    return per_sample[:count].mean() + config.prior_loss_weight * per_sample[count:].mean()


def _predict(session: Session, batch: dict[str, Any], noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    dtype = session.input_dtype
    encoder = session.text_encoder
    if encoder is not None and encoder.training:
        embeddings = encoder(batch["input_ids"])[0]
    else:
        embeddings = batch["embeddings"]
    added = None
    if "pooled" in batch:
        added = {"text_embeds": batch["pooled"].to(dtype), "time_ids": batch["time_ids"].to(dtype)}
    return session.unet(
        noisy.to(dtype), timesteps, encoder_hidden_states=embeddings.to(dtype), added_cond_kwargs=added,
        return_dict=False,
    )[0]


def _sample_noise(latents: torch.Tensor, offset: float, gen: torch.Generator) -> torch.Tensor:
    import torch

    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    if offset > 0:
        batch, channels = latents.shape[:2]
        noise = noise + offset * torch.randn((batch, channels, 1, 1), generator=gen, device=latents.device)
    return noise


def _target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")


def _min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), per sample."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr
