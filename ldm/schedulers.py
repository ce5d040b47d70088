"""Sampler names used on the command line and in configs, mapped to diffusers schedulers.

Every scheduler is built `from_config` of the trained model's scheduler, so it inherits the training noise schedule
(`num_train_timesteps`, `beta_schedule`, `prediction_type`, ...) and only the sampling algorithm changes, and, if
asked, the timestep spacing: which of the T training timesteps N sampling steps visit (Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", table 2):
    leading   0, T/N, 2T/N, ... ascending from 0: the first sampling step is at T - T/N, never at T - 1
    trailing  T-1, T-1-T/N, ... descending from T - 1: the first step starts from (almost) pure noise
    linspace  N points evenly from 0 to T - 1, both ends included
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,  # ancestral sampling of Ho et al. 2020; needs many steps (~1000)
    "ddim": DDIMScheduler,  # Song et al. 2021; deterministic for eta=0, good at 50 steps
    "dpm++": DPMSolverMultistepScheduler,  # DPM-Solver++(2M), Lu et al. 2022; good at 20 steps
    "dpm++sde": DPMSolverMultistepScheduler,  # its stochastic (SDE) variant: fresh noise at every step
    "unipc": UniPCMultistepScheduler,  # UniPC predictor-corrector, Zhao et al. 2023; good at 10-20 steps
    "euler": EulerDiscreteScheduler,  # Euler on the probability-flow ODE in σ, Karras et al. 2022
    "euler-a": EulerAncestralDiscreteScheduler,  # Euler with ancestral noise (stochastic), as in k-diffusion
}
# Config values that make a name what it says, whatever the config it is built from (a saved "dpm++sde" pipeline
# rebuilt as "dpm++" must lose its SDE setting).
SCHEDULER_OPTIONS: dict[str, dict[str, Any]] = {
    "dpm++": {"algorithm_type": "dpmsolver++"},
    "dpm++sde": {"algorithm_type": "sde-dpmsolver++"},
}

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def make_scheduler(name: str, config: Any, timestep_spacing: str | None = None) -> SchedulerMixin:
    """Build the scheduler called `name` (a key of `SCHEDULERS`) from another scheduler's `config`, with
    `timestep_spacing` (one of `TIMESTEP_SPACINGS`) instead of the config's if given.

    Raises:
        ValueError: if `name` is not a known scheduler or `timestep_spacing` not a known spacing; the message lists
            the known ones.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    options = dict(SCHEDULER_OPTIONS.get(name, {}))
    if timestep_spacing is not None:
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"unknown timestep spacing {timestep_spacing!r}; choose one of: {', '.join(TIMESTEP_SPACINGS)}")
        options["timestep_spacing"] = timestep_spacing
    return SCHEDULERS[name].from_config(config, **options)
