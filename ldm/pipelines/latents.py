"""Latent scaling and VAE encode/decode: the one place where images become latents and back.

Latent diffusion (Rombach et al. 2022, Sec. 4.3.2 and App. D.1) trains the UNet on ``z = scaling_factor * (E(x) - shift)``
so that the latents have roughly unit variance, and decodes with ``x = D(z / scaling_factor + shift)``. The factor is
stored in ``vae.config.scaling_factor`` (and the optional shift in ``vae.config.shift_factor``, None for the classic
LDM/SD autoencoders), so a saved model carries it.

This file imports only torch and diffusers: it is copied into every saved model folder beside the pipeline modules.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


def _shift(vae: AutoencoderKL) -> float:
    # `shift_factor` exists since diffusers 0.29 and is None for the classic KL autoencoders.
    return getattr(vae.config, "shift_factor", None) or 0.0


def _posterior_latents(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None, sample: bool
) -> torch.Tensor:
    """Unscaled latents: a sample z ~ q(z|x) (reparameterised, drawn with `generator`) or its mean."""
    images = images.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(images).latent_dist
    return posterior.sample(generator=generator) if sample else posterior.mean


def scale(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Unscaled posterior latents -> the UNet's latents, ``(z - shift_factor) * scaling_factor``."""
    return (z - _shift(vae)) * vae.config.scaling_factor


def posterior_moments(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance of q(z|x) (unscaled; logvar clamped to [-30, 20] as diffusers does).

    They are all a latent cache needs: `sample_from_moments` then draws a fresh z per epoch, as training on the
    images would. Gradients flow if enabled; wrap in `torch.no_grad()` for a frozen VAE.
    """
    images = images.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(images).latent_dist
    return posterior.mean, posterior.logvar


def sample_from_moments(
    vae: AutoencoderKL, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scaled latents ``scale(mean + exp(logvar / 2) * eps)``, eps ~ N(0, I): the same draw as `encode` makes.

    Computed in the moments' dtype (a cache stores float32) on the VAE's device; only `vae.config` is read.
    """
    params = torch.cat([mean, logvar], dim=1).to(device=vae.device)
    return scale(vae, DiagonalGaussianDistribution(params).sample(generator=generator))


def encode(
    vae: AutoencoderKL,
    images: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """Encode images to the scaled latents the UNet is trained on.

    Args:
        vae: the KL autoencoder.
        images: (B, C, H, W) in [-1, 1]; moved to the VAE's device and dtype.
        generator: makes the posterior sample reproducible (ignored when `sample=False`).
        sample: draw z ~ q(z|x) (as in LDM training) or take the posterior mean.

    Returns:
        (B, latent_channels, H/f, W/f) latents, ``(z - shift_factor) * scaling_factor``.

    Gradients flow if the caller has them enabled; wrap in `torch.no_grad()` when the VAE is frozen.
    """
    return scale(vae, _posterior_latents(vae, images, generator, sample))


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Decode scaled latents to images, the inverse of `encode`.

    Args:
        vae: the KL autoencoder.
        latents: (B, latent_channels, h, w) scaled latents, as produced by `encode` or by the diffusion sampler.

    Returns:
        (B, C, H, W) images, nominally in [-1, 1] but NOT clamped (callers clamp, e.g. ``(x / 2 + 0.5).clamp(0, 1)``).
    """
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    return vae.decode(latents / vae.config.scaling_factor + _shift(vae)).sample


def _as_images(batch: torch.Tensor | dict) -> torch.Tensor:
    # Data loaders of this project yield tensors or {"pixel_values": tensor, ...} dicts.
    if isinstance(batch, dict):
        if "pixel_values" not in batch:
            raise KeyError(f"dict batches need a 'pixel_values' key, got keys {sorted(batch)}")
        return batch["pixel_values"]
    if isinstance(batch, (list, tuple)):  # e.g. (images, labels) from a TensorDataset
        return batch[0]
    return batch


@torch.no_grad()
def measure_latent_statistics(
    vae: AutoencoderKL,
    images: Iterable[torch.Tensor | dict],
    num_samples: int,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Mean and standard deviation of UNscaled posterior samples z ~ q(z|x), over every latent element of up to
    `num_samples` images: ``shift_factor = mean`` and ``scaling_factor = 1 / std`` give the UNet latents of mean 0
    and std 1 on these images.

    Args:
        vae: the KL autoencoder (put in eval mode for the measurement, then restored).
        images: an iterable or DataLoader of batches in [-1, 1]: tensors (B, C, H, W), (images, ...) tuples,
            or dicts with key ``"pixel_values"``.
        num_samples: how many images to use at most.
        generator: for the posterior samples; defaults to a CPU generator seeded with 0, so the result is reproducible.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    was_training = vae.training
    vae.eval()
    # Running sums in float64: E[z] and E[z^2] over all elements, so any number of batches fits in memory.
    count, total, total_sq, seen = 0, 0.0, 0.0, 0
    try:
        for batch in images:
            x = _as_images(batch)[: num_samples - seen]
            z = _posterior_latents(vae, x, generator, sample=True).double()
            count += z.numel()
            total += z.sum().item()
            total_sq += z.square().sum().item()
            seen += x.shape[0]
            if seen >= num_samples:
                break
    finally:
        vae.train(was_training)
    if count == 0:
        raise ValueError("measuring the latent statistics got no images")
    mean = total / count
    std = max(total_sq / count - mean * mean, 0.0) ** 0.5
    if std == 0.0:
        raise ValueError("latents have zero variance; cannot measure a scaling factor")
    return mean, std


def measure_scaling_factor(
    vae: AutoencoderKL,
    images: Iterable[torch.Tensor | dict],
    num_samples: int,
    generator: torch.Generator | None = None,
) -> float:
    """Measure the LDM scaling factor ``1 / std(z)`` of UNscaled posterior samples.

    The LDM paper (App. D.1) rescales latents by the component-wise standard deviation of the first batch of
    encodings; here the std is taken over every latent element of up to `num_samples` images (arguments as
    `measure_latent_statistics`). Returns the factor to store in ``vae.config.scaling_factor``.
    """
    return 1.0 / measure_latent_statistics(vae, images, num_samples, generator)[1]
