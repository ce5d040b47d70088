"""RePaint's resampling schedule (Lugmayr et al. 2022) for any diffusers scheduler, on latents.

diffusers' `RePaintScheduler` walks a schedule of timesteps that mostly goes down (denoise x_t -> x_{t-1}) but
every `jump_length` steps jumps back up `jump_length` steps (re-noise), `jump_n_sample - 1` times, so that the
generated region and the known region, re-imposed at every step, have time to agree. Here the same schedule is
built over the INFERENCE steps of any scheduler:

  position i in 0..n-1 means "latents at the noise level of scheduler.timesteps[i]"; n means clean latents.
  a step down i -> i+1 is the scheduler's own `step` at timesteps[i];
  a step up i+1 -> i is the forward process between the two levels (`renoise`).

The rule for which schedulers can resample (jump_n_sample > 1): those whose `step` depends only on the timestep it
is given (DDPM, DDIM: no `step_index`), and flow-matching Euler, whose step x_σ' = x_σ + (σ' − σ)·v depends only on
the σ pair at its step index, which `rewind` sets back after a jump (diffusers' public `set_timesteps` and
`set_begin_index`). Multistep and sigma-indexed DDPM-family schedulers (DPM-Solver++, UniPC, Euler) and flow-matching
Heun keep past model outputs (or a half-finished second-order step) that a jump back would invalidate, so with them
only the known region is re-imposed at every step (jump_n_sample = 1).

The jump up, from a level with less noise to one with more, is the forward process between the two levels:
  variance preserving (DDPM family)  x_h = sqrt(ᾱ_h / ᾱ_l)·x_l + sqrt(1 − ᾱ_h / ᾱ_l)·ε
  flow matching, α = 1 − σ           x_h = (α_h / α_l)·x_l + sqrt(σ_h² − (α_h·σ_l / α_l)²)·ε
The second: x_l = α_l·x + σ_l·ε₁, so (α_h/α_l)·x_l = α_h·x + (α_h·σ_l/α_l)·ε₁, and the fresh noise tops the variance
up to σ_h², which gives x_h = α_h·x + σ_h·ε exactly, the interpolation at σ_h (σ/α grows with σ, so the root is real).

This file imports only torch and its sibling noising.py: it is copied into every saved model folder.
"""

from __future__ import annotations

import torch

from .noising import is_flow_matching


def check_jumps(num_inference_steps: int, jump_length: int, jump_n_sample: int) -> None:
    """Resampling (jump_n_sample > 1) jumps back from the steps-left counts 0, jump_length, 2 jump_length, ... below
    n - jump_length: with jump_length >= n there is none, and resampling would be off without a word (as it is in
    diffusers' RePaintScheduler), so it is a ValueError. Without resampling jump_length is unused."""
    if jump_n_sample > 1 and jump_length >= num_inference_steps:
        raise ValueError(f"jump_length={jump_length} is not shorter than num_inference_steps={num_inference_steps}: "
                         f"RePaint would make no jump and jump_n_sample={jump_n_sample} would resample nothing; use a "
                         f"jump_length below {num_inference_steps} (RePaint: 10 of 250 steps), or jump_n_sample=1")


def repaint_positions(num_inference_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """Positions 0, 1, ..., n visited in order, with RePaint's jumps (RePaintScheduler.set_timesteps, re-indexed
    from "steps left" t to positions n - t)."""
    check_jumps(num_inference_steps, jump_length, jump_n_sample)
    n = num_inference_steps
    jumps = {j: jump_n_sample - 1 for j in range(0, n - jump_length, jump_length)}
    t, steps_left = n, [n]
    while t >= 1:
        t -= 1
        steps_left.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                steps_left.append(t)
    return [n - t for t in steps_left]


def supports_resampling(scheduler) -> bool:
    """Whether `scheduler.step` may be called again at an earlier timestep (see the module docstring)."""
    if is_flow_matching(scheduler):
        return scheduler.order == 1 and hasattr(scheduler, "set_begin_index")
    return not hasattr(scheduler, "step_index") and hasattr(scheduler, "alphas_cumprod")


def rewind(scheduler, position: int, num_inference_steps: int, device) -> None:
    """Make the next `step` of a step-indexed scheduler (flow-matching Euler) start at `position`, after a jump back;
    schedulers without a step index need nothing."""
    if is_flow_matching(scheduler):
        scheduler.set_timesteps(num_inference_steps, device=device)  # the same grid, step index cleared
        scheduler.set_begin_index(position)


def alpha_bar(scheduler, position: int) -> torch.Tensor:
    """ᾱ at a position of the schedule; 1 for the clean latents at position n."""
    timesteps = scheduler.timesteps
    if position >= len(timesteps):
        return torch.tensor(1.0)
    return scheduler.alphas_cumprod[int(timesteps[position])]


def flow_renoise(latents: torch.Tensor, sigma_high, sigma_low, noise: torch.Tensor) -> torch.Tensor:
    """x_h = (α_h/α_l)·x_l + sqrt(σ_h² − (α_h·σ_l/α_l)²)·ε with α = 1 − σ: from x_l on the straight path at σ_low to
    one at σ_high >= σ_low (the module docstring derives it)."""
    sigma_high, sigma_low = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma_high, sigma_low))
    ratio = (1 - sigma_high) / (1 - sigma_low)
    extra = (sigma_high ** 2 - (ratio * sigma_low) ** 2).clamp(min=0).sqrt()
    return ratio.to(latents.dtype) * latents + extra.to(latents.dtype) * noise


def renoise(scheduler, latents: torch.Tensor, high: int, low: int, generator=None) -> torch.Tensor:
    """Jump back from position `low` (less noise) to `high` < `low` (more noise) by the forward process between the
    two levels (RePaint's undo step; the module docstring gives both families' equations)."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if is_flow_matching(scheduler):
        # sigmas holds one σ per position and the final 0 (the clean latents at position n)
        return flow_renoise(latents, scheduler.sigmas[high], scheduler.sigmas[low], noise)
    ratio = (alpha_bar(scheduler, high) / alpha_bar(scheduler, low)).to(latents.dtype)
    return ratio.sqrt() * latents + (1 - ratio).sqrt() * noise
