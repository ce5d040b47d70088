"""RePaint's resampling schedule (Lugmayr et al. 2022) for any diffusers scheduler, on latents.

diffusers' `RePaintScheduler` walks a schedule of timesteps that mostly goes down (denoise x_t -> x_{t-1}) but
every `jump_length` steps jumps back up `jump_length` steps (re-noise), `jump_n_sample - 1` times, so that the
generated region and the known region, re-imposed at every step, have time to agree. Here the same schedule is
built over the INFERENCE steps of any scheduler:

  position i in 0..n-1 means "latents at the noise level of scheduler.timesteps[i]"; n means clean latents.
  a step down i -> i+1 is the scheduler's own `step` at timesteps[i];
  a step up i+1 -> i is the forward process between the two levels (`renoise`).

The rule for which schedulers can resample (jump_n_sample > 1): those whose `step` depends only on the timestep it
is given (DDPM, DDIM: no `step_index`). Multistep and sigma-indexed schedulers (DPM-Solver++, UniPC, Euler) keep a
step counter and past model outputs that a jump back would invalidate, so with them only the known region is
re-imposed at every step (jump_n_sample = 1).

This file imports only torch: it is copied into every saved model folder.
"""

from __future__ import annotations

import torch


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
    return not hasattr(scheduler, "step_index") and hasattr(scheduler, "alphas_cumprod")


def alpha_bar(scheduler, position: int) -> torch.Tensor:
    """ᾱ at a position of the schedule; 1 for the clean latents at position n."""
    timesteps = scheduler.timesteps
    if position >= len(timesteps):
        return torch.tensor(1.0)
    return scheduler.alphas_cumprod[int(timesteps[position])]


def renoise(scheduler, latents: torch.Tensor, high: int, low: int, generator=None) -> torch.Tensor:
    """Jump back from position `low` (less noise) to `high` < `low` (more noise): the forward process of a
    variance-preserving schedule, x_high = sqrt(ᾱ_h / ᾱ_l) x_low + sqrt(1 - ᾱ_h / ᾱ_l) ε (RePaint's undo step)."""
    from diffusers.utils.torch_utils import randn_tensor

    ratio = (alpha_bar(scheduler, high) / alpha_bar(scheduler, low)).to(latents.dtype)
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return ratio.sqrt() * latents + (1 - ratio).sqrt() * noise
