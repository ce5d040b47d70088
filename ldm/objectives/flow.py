"""Rectified flow (Liu et al. 2023; Esser et al. 2024, "Stable Diffusion 3"): the `diffusion.objective: flow` math.

    x_σ = (1 − σ)·x + σ·ε                  the straight path from the data x (σ = 0) to the noise ε (σ = 1)
    v   = dx_σ/dσ = ε − x                  what the network learns to predict (the velocity), by MSE
    u   ~ logit-normal(m, s)  or  U(0, 1)  diffusers' `compute_density_for_timestep_sampling` (SD3's density)
    σ   = shift·u / (1 + (shift − 1)·u)    the resolution shift (SD3 §5.3.2; shift > 1 spends more steps at high σ)
    t   = σ·T                              the timestep the network is given (T = num_train_timesteps)

The saved `FlowMatchEulerDiscreteScheduler` holds the same `shift` and `num_train_timesteps`: at sampling it visits
σ_i = shift(u_i) for u_i evenly spaced from 1 down, and passes t_i = σ_i·T to the network. Training draws σ through
the same map, so the network learns the σ that sampling asks about (a shift applied only at sampling time, as in
Nerogar/OneTrainer #615, samples σ the network rarely saw); tests/test_flow.py checks that the two agree.

`FlowObjective` is this module's objective for training (the interface of `ldm.objectives`). The sampler side
(Euler, Heun, img2img noising, RePaint's re-noising) is the schedulers' and `ldm.pipelines`' job.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from ldm.losses import Logs, diffusion_loss


@dataclass(frozen=True)
class SigmaSampling:
    """How training draws σ: the flow keys of `diffusion`, with SD3's values where a key is null."""

    weighting_scheme: str = "logit_normal"  # density of u: "logit_normal" (SD3's default) or "uniform"
    logit_mean: float = 0.0  # m of logit-normal: u = sigmoid(m + s·n), n ~ N(0, 1); m > 0 favours high σ
    logit_std: float = 1.0  # s of logit-normal
    shift: float = 1.0  # the resolution shift; 1: σ = u

    @classmethod
    def from_config(cls, diffusion_cfg) -> SigmaSampling:
        """From a DiffusionConfig: `flow_shift`, `weighting_scheme`, `logit_mean`, `logit_std`; null keeps the default."""
        names = {"shift": "flow_shift"}
        given = {f.name: getattr(diffusion_cfg, names.get(f.name, f.name)) for f in fields(cls)}
        return cls(**{k: v for k, v in given.items() if v is not None})


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """σ = shift·u / (1 + (shift − 1)·u): the map FlowMatchEulerDiscreteScheduler applies to its σ grid."""
    return shift * u / (1 + (shift - 1) * u)


def interpolate(x: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x + σ·ε, one σ per sample of the batch."""
    sigmas = sigmas.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return (1 - sigmas) * x + sigmas * noise


def velocity(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target v = dx_σ/dσ = ε − x (the same for every σ of the straight path)."""
    return noise - x


def sample_sigmas(sampling: SigmaSampling, batch_size: int, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """σ for a batch: u from the density (SD3's `compute_density_for_timestep_sampling`), then the shift."""
    u = compute_density_for_timestep_sampling(sampling.weighting_scheme, batch_size, logit_mean=sampling.logit_mean,
                                              logit_std=sampling.logit_std, device=device, generator=generator)
    return shifted(u, sampling.shift)


def timesteps_of(sigmas: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """t = σ·T, the (real-valued) timestep diffusers' flow schedulers pass to the network."""
    return sigmas * num_train_timesteps


def build_flow_scheduler(num_train_timesteps: int, shift: float) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler saved with a flow model: flow-matching Euler with the training shift (samplers built from its
    config, `ldm.schedulers.make_scheduler`, inherit both)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)


class FlowObjective:
    """Velocity prediction on the straight path; the interface of ldm.objectives (t = σ·T throughout)."""

    def __init__(self, diffusion_cfg):
        self.sampling = SigmaSampling.from_config(diffusion_cfg)
        self.num_train_timesteps = diffusion_cfg.num_train_timesteps
        self.scheduler = build_flow_scheduler(self.num_train_timesteps, self.sampling.shift)

    def sample_t(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        # No generator: the global RNG, as the DDPM objective's randint, so that a resumed run draws the same σ.
        return timesteps_of(sample_sigmas(self.sampling, batch_size, device), self.num_train_timesteps)

    def noisy(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return interpolate(x, noise, t / self.num_train_timesteps)

    def target(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return velocity(x, noise)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        # Plain MSE: the logit-normal density already weights the σ that matter (SD3's "weighting_scheme" samples
        # σ by it rather than weighting the loss).
        return diffusion_loss(pred, target, t, self.scheduler)
