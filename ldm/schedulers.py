"""Sampler names used on the command line and in configs, mapped to diffusers schedulers.

Every scheduler is built `from_config` of the trained model's scheduler, so it inherits the training noise schedule
(`num_train_timesteps`, `beta_schedule`, `prediction_type`, ...) and only the sampling algorithm changes.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,  # ancestral sampling of Ho et al. 2020; needs many steps (~1000)
    "ddim": DDIMScheduler,  # Song et al. 2021; deterministic for eta=0, good at 50 steps
    "dpm++": DPMSolverMultistepScheduler,  # DPM-Solver++(2M), Lu et al. 2022; good at 20 steps
    "unipc": UniPCMultistepScheduler,  # UniPC predictor-corrector, Zhao et al. 2023; good at 10-20 steps
    "euler": EulerDiscreteScheduler,  # Euler on the probability-flow ODE in σ, Karras et al. 2022
}


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """Build the scheduler called `name` (a key of `SCHEDULERS`) from another scheduler's `config`.

    Raises:
        ValueError: if `name` is not a known scheduler; the message lists the known ones.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)
