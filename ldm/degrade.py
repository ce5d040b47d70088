"""The random part of the super-resolution degradation (`data.degrade`), applied to low-res images while training.

The deterministic part, bicubic downsampling by `data.degrade.factor`, is made by the data transform
(`ldm.data.ImageTransform.apply_pair`) and stored in the latent cache; blur and noise are drawn afresh every step:

  1. Gaussian blur, σ ~ U[0, blur_sigma] low-res pixels per image (reflect padding);
  2. additive Gaussian noise, std ~ U[0, noise_std] per image, on [-1, 1] values.

Both follow the blur and noise stages of LDM's BSR degradation (Rombach et al. 2022, App. C; Zhang et al. 2021),
in a fixed order and without JPEG or camera-sensor noise. With both at 0 (the default) this is the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ldm.config import DegradeConfig


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each image of (B, C, H, W) with its own σ (σ = 0: unchanged), as one grouped convolution."""
    radius = max(1, math.ceil(3 * max_sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    s = sigmas.to(images.dtype).clamp_min(1e-6).view(-1, 1)
    kernel_1d = torch.exp(-0.5 * (x / s) ** 2)
    kernel_1d = kernel_1d / kernel_1d.sum(dim=1, keepdim=True)  # σ -> 0 gives the delta kernel
    b, c, h, w = images.shape
    kernel = (kernel_1d[:, :, None] * kernel_1d[:, None, :]).repeat_interleave(c, dim=0)[:, None]
    padded = F.pad(images.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect" if radius < min(h, w) else "replicate")
    return F.conv2d(padded, kernel, groups=b * c).reshape(b, c, h, w)


def degrade(low_res: torch.Tensor, cfg: DegradeConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time blur and noise of a batch of low-res images in [-1, 1] (see the module docstring)."""
    b = low_res.shape[0]
    if cfg.blur_sigma > 0:
        sigmas = torch.rand(b, generator=generator, device=low_res.device) * cfg.blur_sigma
        low_res = gaussian_blur(low_res, sigmas, cfg.blur_sigma)
    if cfg.noise_std > 0:
        std = torch.rand(b, 1, 1, 1, generator=generator, device=low_res.device) * cfg.noise_std
        noise = torch.randn(low_res.shape, generator=generator, device=low_res.device, dtype=low_res.dtype)
        low_res = low_res + std * noise
    return low_res
