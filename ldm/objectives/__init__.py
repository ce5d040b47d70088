"""Training objectives: how noise and data are mixed, what the network predicts, and the scheduler saved with it.

One module per objective (`denoiser.diffusion.objective`), each a class with the same small interface, so that the
training task and the pipelines never branch on the objective (diffusers' split: the scheduler owns the noise math,
the network only predicts; willisma/SiT's `transport/`):

    scheduler                     the training scheduler, saved with the pipeline; samplers are built from its config
    sample_t(batch_size, device)  the timesteps the network is given, one per example, from the global RNG (which
                                  accelerate saves with every checkpoint, so a resumed run draws the same ones)
    noisy(x, noise, t)            the network's input x_t
    target(x, noise, t)           what the network learns to predict
    loss(pred, target, t)         (loss, logs)

  ddpm.py  DDPM/LDM: x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε, t ~ U{0..T−1}, predicts ε (or v); DDPMScheduler
  flow.py  rectified flow (SD3): x_σ = (1 − σ)·x + σ·ε, σ logit-normal or uniform through the resolution shift,
           predicts the velocity ε − x; FlowMatchEulerDiscreteScheduler with the same shift
"""

from __future__ import annotations

from ldm.config import DiffusionConfig
from ldm.objectives.ddpm import DDPMObjective
from ldm.objectives.flow import FlowObjective

OBJECTIVES = {"ddpm": DDPMObjective, "flow": FlowObjective}


def make_objective(diffusion_cfg: DiffusionConfig) -> DDPMObjective | FlowObjective:
    """The objective `diffusion_cfg.objective` names, built from the rest of `diffusion_cfg`."""
    return OBJECTIVES[diffusion_cfg.objective](diffusion_cfg)


__all__ = ["OBJECTIVES", "DDPMObjective", "FlowObjective", "make_objective"]
