"""The forward process as the scheduler defines it, for both families of diffusers schedulers the pipelines run.

  DDPM family (DDPM, DDIM, DPM-Solver++, UniPC, Euler, ...)   x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε     `add_noise`
      sampling starts from ε·`init_noise_sigma`; the network input is `scale_model_input(x_t, t)`
  flow matching (FlowMatchEuler, FlowMatchHeun)              x_σ = (1 − σ)·x + σ·ε                 `scale_noise`
      sampling starts from x_1 = ε (unit std); the network takes x_σ as it is, with t = σ·T

Flow-matching schedulers have no `init_noise_sigma`, `scale_model_input` or `add_noise`: the pipelines call these
functions instead of the scheduler's methods, so that every pipeline runs either kind of model.

This file imports only torch: it is copied into every saved model folder.
"""

from __future__ import annotations

import torch


def is_flow_matching(scheduler) -> bool:
    """Whether `scheduler` integrates a flow-matching ODE in σ (diffusers' FlowMatch* schedulers: `scale_noise`)."""
    return hasattr(scheduler, "scale_noise") and not hasattr(scheduler, "alphas_cumprod")


def initial_noise_scale(scheduler) -> float:
    """The std of the latents sampling starts from: `init_noise_sigma` (1, or σ_max for Euler), 1 for flow (x_1 = ε)."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


def scale_model_input(scheduler, sample: torch.Tensor, timestep) -> torch.Tensor:
    """The network input at `timestep`: the scheduler's scaling (1/sqrt(σ²+1) for Euler), x_σ itself for flow."""
    if hasattr(scheduler, "scale_model_input"):
        return scheduler.scale_model_input(sample, timestep)
    return sample


def noise_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Clean `latents` noised to `timesteps` (one per sample): `add_noise`, or `scale_noise` for flow matching, whose
    σ is the one of the scheduler's current step (its begin index before the first step, as diffusers' SD3
    img2img and inpainting pipelines use it)."""
    if is_flow_matching(scheduler):
        return scheduler.scale_noise(latents, timesteps, noise)
    return scheduler.add_noise(latents, noise, timesteps)
