"""Sampler names used on the command line and in configs, mapped to diffusers schedulers.

Every scheduler is built `from_config` of the trained model's scheduler, so it inherits the training noise schedule
(`num_train_timesteps`, `beta_schedule`, `prediction_type`, ...) and only the sampling algorithm changes, and, if
asked, the timestep spacing: which of the T training timesteps N sampling steps visit (Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", table 2):
    leading   0, T/N, 2T/N, ... ascending from 0: the first sampling step is at T - T/N, never at T - 1
    trailing  T-1, T-1-T/N, ... descending from T - 1: the first step starts from (almost) pure noise
    linspace  N points evenly from 0 to T - 1, both ends included

A flow-matching model (`diffusion.objective: flow`) is sampled by the flow-matching samplers alone, and a DDPM model by
the others: the two families read different things from the same network (a velocity against a noise or v
prediction) and `make_scheduler` refuses a name of the other family. Flow samplers step σ from 1 down through the
model's `shift` (their config), so they take no timestep spacing.

A third family samples the students of `ldm distill` (latent consistency models, `ldm.distill`): `lcm`, diffusers'
LCMScheduler, which evaluates the student's consistency function and re-noises between steps, on the grid of timesteps
the student was distilled on (`original_inference_steps` points, k − 1, 2k − 1, ..., T − 1); it takes no timestep
spacing either. A student is sampled by `lcm` alone, and `lcm` samples students alone.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    LCMScheduler,
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
    "flow-euler": FlowMatchEulerDiscreteScheduler,  # flow models: Euler on dx/dσ = v, x_σ' = x_σ + (σ' − σ)·v
    "flow-heun": FlowMatchHeunDiscreteScheduler,  # flow models: Heun (2nd order), two model calls per step
    "lcm": LCMScheduler,  # consistency students (ldm distill): f(x_t, t), then fresh noise to the next step; 1-8 steps
}
FLOW_SCHEDULERS = ("flow-euler", "flow-heun")  # the names that sample flow-matching models, and only they
CONSISTENCY_SCHEDULERS = ("lcm",)  # the names that sample consistency-distilled students, and only they
# What `ldm eval`, `ldm edit` and `ldm upscale` sample with when no --scheduler is given, by the model's objective:
# DDIM for DDPM models, and flow-matching Euler for flow models, the samplers that RePaint's resampling can rewind.
CLI_SCHEDULERS = {"ddpm": "ddim", "flow": "flow-euler", "consistency": "lcm"}
# `ldm sweep`'s samplers when no --schedulers are given.
SWEEP_SCHEDULERS = {"ddpm": ("ddim", "dpm++", "unipc", "euler", "ddpm"), "flow": FLOW_SCHEDULERS,
                    "consistency": CONSISTENCY_SCHEDULERS}
# Config values that make a name what it says, whatever the config it is built from (a saved "dpm++sde" pipeline
# rebuilt as "dpm++" must lose its SDE setting).
SCHEDULER_OPTIONS: dict[str, dict[str, Any]] = {
    "dpm++": {"algorithm_type": "dpmsolver++"},
    "dpm++sde": {"algorithm_type": "sde-dpmsolver++"},
}

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def objective_of(config: Any) -> str:
    """"flow" for a flow-matching scheduler's config (a `shift`, no betas), "consistency" for a consistency student's
    LCMScheduler (its `timestep_scaling`; a config saved by another class keeps such keys, hence the class name where
    the config has one), else "ddpm"."""
    if "shift" in config and "beta_start" not in config:
        return "flow"
    if "timestep_scaling" in config and config.get("_class_name", "LCMScheduler") == "LCMScheduler":
        return "consistency"
    return "ddpm"


def scheduler_objective(name: str) -> str:
    """The objective the sampler called `name` samples: "flow", "consistency" or "ddpm"."""
    if name in CONSISTENCY_SCHEDULERS:
        return "consistency"
    return "flow" if name in FLOW_SCHEDULERS else "ddpm"


def default_scheduler(config: Any) -> str:
    """The sampler name the commands use for a model with this scheduler config when none is given."""
    return CLI_SCHEDULERS[objective_of(config)]


def timestep_spacing_of(config: Any) -> str:
    """Where a sampler's steps lie, for reports: its timestep spacing, or "shift S" for a flow sampler (which steps
    σ evenly from 1 through the shift)."""
    if objective_of(config) == "flow":
        return f"shift {config['shift']:g}"
    if objective_of(config) == "consistency":
        return f"grid of {config['original_inference_steps']}"
    return config.get("timestep_spacing", "leading")


def names_for(objective: str) -> list[str]:
    """The sampler names that fit models of `objective`."""
    return [n for n in SCHEDULERS if scheduler_objective(n) == objective]


def check_fits(name: str, objective: str, key: str = "scheduler") -> None:
    """ValueError naming `key` if the sampler `name` cannot sample a model trained with `objective`."""
    if scheduler_objective(name) != objective:
        family = {"flow": "a flow-matching (diffusion.objective: flow)",
                  "ddpm": "a DDPM (diffusion.objective: ddpm)",
                  "consistency": "a consistency-distilled (ldm distill)"}
        raise ValueError(f"{key} {name!r} samples {family[scheduler_objective(name)]} model, and this one is "
                         f"{family[objective]} model; choose one of: {', '.join(names_for(objective))}")


def make_scheduler(name: str, config: Any, timestep_spacing: str | None = None, key: str = "scheduler",
                   spacing_key: str = "timestep_spacing") -> SchedulerMixin:
    """Build the scheduler called `name` (a key of `SCHEDULERS`) from another scheduler's `config`, with
    `timestep_spacing` (one of `TIMESTEP_SPACINGS`) instead of the config's if given.

    Raises:
        ValueError: if `name` is not a known scheduler, does not fit the model's objective (a flow sampler on a DDPM
            model or the reverse), or `timestep_spacing` is not a known spacing or is given to a flow sampler; the
            message names `key` or `spacing_key` (config keys or command-line flags) and lists what fits.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"{key}: unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    check_fits(name, objective_of(config), key)
    options = dict(SCHEDULER_OPTIONS.get(name, {}))
    if timestep_spacing is not None and name in FLOW_SCHEDULERS:
        raise ValueError(f"{spacing_key} {timestep_spacing!r}: flow-matching samplers take none (they step σ "
                         f"evenly from 1 through the model's shift); leave it out with {name!r}")
    if timestep_spacing is not None and name in CONSISTENCY_SCHEDULERS:
        raise ValueError(f"{spacing_key} {timestep_spacing!r}: {name!r} takes none (it steps on the grid of timesteps "
                         "the student was distilled on); leave it out")
    if timestep_spacing is not None:
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"{spacing_key}: unknown timestep spacing {timestep_spacing!r}; choose one of: "
                             f"{', '.join(TIMESTEP_SPACINGS)}")
        options["timestep_spacing"] = timestep_spacing
    return SCHEDULERS[name].from_config(config, **options)

