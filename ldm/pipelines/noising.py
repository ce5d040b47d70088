"""The forward process as the scheduler defines it, for both families of diffusers schedulers the pipelines run.

  DDPM family (DDPM, DDIM, DPM-Solver++, UniPC, Euler, ...)   x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε     `add_noise`
      sampling starts from ε·`init_noise_sigma`; the network input is `scale_model_input(x_t, t)`
  flow matching (FlowMatchEuler, FlowMatchHeun)              x_σ = (1 − σ)·x + σ·ε                 `scale_noise`
      sampling starts from x_1 = ε (unit std); the network takes x_σ as it is, with t = σ·T

Flow-matching schedulers have no `init_noise_sigma`, `scale_model_input` or `add_noise`: the pipelines call these
functions instead of the scheduler's methods, so that every pipeline runs either kind of model.

A consistency student (`ldm distill`) is sampled by LCMScheduler on the grid of timesteps it was distilled on; more
steps than that grid has are a warning here, not LCMScheduler's error (`consistency_grid`).

This file imports only torch: it is copied into every saved model folder.
"""

from __future__ import annotations

import inspect
import warnings

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


def consistency_grid(scheduler, num_inference_steps: int) -> int | None:
    """The grid a consistency student's LCMScheduler is to place `num_inference_steps` steps on: None (its own, the
    `original_inference_steps` points it was distilled on) when they fit; more steps than that warn and get a grid
    of as many points (LCMScheduler would refuse them), whose timesteps the student never learned at."""
    grid = getattr(scheduler.config, "original_inference_steps", None)
    takes_grid = "original_inference_steps" in inspect.signature(scheduler.set_timesteps).parameters
    if grid is None or not takes_grid or num_inference_steps <= grid:
        return None
    warnings.warn(f"num_inference_steps={num_inference_steps}: this consistency student was distilled for at most "
                  f"{grid} steps (the grid of timesteps it learned on); sampling {num_inference_steps} steps on a finer "
                  "grid, whose images need not be better (its own step count is best)", UserWarning, stacklevel=3)
    return num_inference_steps


def set_timesteps(scheduler, num_inference_steps: int, device: torch.device | str | None = None) -> None:
    """`scheduler.set_timesteps`, with `consistency_grid`'s finer grid for a student asked for more steps."""
    grid = consistency_grid(scheduler, num_inference_steps)
    if grid is None:
        scheduler.set_timesteps(num_inference_steps, device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device, original_inference_steps=grid)
