"""Checks of the `distill` section (`ldm distill`) that types cannot express; each error names the key.

What depends on the teacher (the skip interval dividing its timesteps, its autoencoder and classes fitting the data)
is checked once its folder is read, before any work: `ldm.distill.teacher`.
"""

from __future__ import annotations

import math

from ldm.config.schema import ConfigError, RunConfig


def validate_distill(cfg: RunConfig) -> None:
    """The distillation's own keys, then its `train` section as the stages' are checked."""
    d = cfg.distill
    for key, value in (("skip_interval", d.skip_interval), ("num_inference_steps", d.num_inference_steps)):
        if value < 1:
            raise ConfigError(f"distill.{key}: must be positive, got {value}")
    if not 0.0 <= d.target_decay < 1.0:
        raise ConfigError(f"distill.target_decay: must be in [0, 1) (LCM: 0.95), got {d.target_decay}")
    for key in ("timestep_scaling", "huber_c"):
        if not (math.isfinite(getattr(d, key)) and getattr(d, key) > 0):
            raise ConfigError(f"distill.{key}: must be a finite number > 0, got {getattr(d, key)}")
    if d.guidance_scale is not None and not (math.isfinite(d.guidance_scale) and d.guidance_scale >= 0):
        raise ConfigError(f"distill.guidance_scale: must be >= 0 (1: the conditional teacher alone; null: the "
                          f"teacher's own scale), got {d.guidance_scale}")
    if d.teacher is not None and not d.teacher.strip():
        raise ConfigError("distill.teacher: empty; give the teacher's pipeline folder (ldm distill --model DIR)")
    _validate_train(cfg)


def _validate_train(cfg: RunConfig) -> None:
    """distill.train: the ranges that validation.py checks for the vae and denoiser stages' train sections."""
    from ldm.config.validation import STAGE_AT_LEAST_ONE, STAGE_AT_LEAST_ZERO

    t = cfg.distill.train
    for names, low in ((STAGE_AT_LEAST_ONE, 1), (STAGE_AT_LEAST_ZERO, 0)):
        for name in names:
            value = getattr(t, name)
            if value is not None and value < low:
                raise ConfigError(f"distill.train.{name}: must be {'positive' if low else '>= 0'}, got {value}")
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_bad_steps", "budget_probe_steps"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"distill.train.{name}: must be positive, got {getattr(t, name)}")
    if t.max_minutes is not None and t.max_minutes <= 0:
        raise ConfigError(f"distill.train.max_minutes: must be positive (or null for no budget), got {t.max_minutes}")
    if t.learning_rate <= 0 or t.adam_epsilon <= 0:
        raise ConfigError("distill.train.learning_rate and distill.train.adam_epsilon: must be positive, got "
                          f"{t.learning_rate} and {t.adam_epsilon}")
    for name in ("adam_beta1", "adam_beta2", "ema_decay"):
        if not 0.0 <= getattr(t, name) < 1.0:
            raise ConfigError(f"distill.train.{name}: must be in [0, 1), got {getattr(t, name)}")
    if t.ema_posthoc:
        raise ConfigError("distill.train.ema_posthoc: post-hoc EMA is built for the denoiser stage; a distillation "
                          "saves its train.ema_decay average")
