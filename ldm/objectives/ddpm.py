"""The DDPM objective of the LDM paper (Ho et al. 2020; Rombach et al. 2022): `diffusion.objective: ddpm`.

    t ~ U{0, ..., T − 1}
    x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε          DDPMScheduler.add_noise, ᾱ from the beta schedule
    target = ε, or v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x (prediction_type)
    loss = MSE, optionally min-SNR-γ weighted   ldm.losses.diffusion_loss
"""

from __future__ import annotations

import torch

from ldm.config import DiffusionConfig
from ldm.losses import Logs, diffusion_loss, diffusion_target
from ldm.models import build_noise_scheduler


class DDPMObjective:
    """Noise prediction (or v) under the variance-preserving forward process; the interface of ldm.objectives."""

    def __init__(self, diffusion_cfg: DiffusionConfig):
        self.scheduler = build_noise_scheduler(diffusion_cfg)
        self.snr_gamma = diffusion_cfg.snr_gamma

    def sample_t(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (batch_size,), device=device)

    def noisy(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x, noise, t)

    def target(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return diffusion_target(self.scheduler, x, noise, t)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        return diffusion_loss(pred, target, t, self.scheduler, self.snr_gamma)
