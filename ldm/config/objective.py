"""The keys whose meaning depends on `denoiser.diffusion.objective`: which objective each belongs to (a key of the
other one is refused by name, before any work) and what its null means (filled in when the config is loaded, so that
the config saved with every run holds the values it trained and sampled with).

  ddpm only   prediction_type, snr_gamma, beta_schedule/beta_start/beta_end, sample_timestep_spacing, the DDPM samplers
  flow only   flow_shift, weighting_scheme, logit_mean, logit_std, the flow samplers (flow-euler, flow-heun)
"""

from __future__ import annotations

import dataclasses
import math

from ldm.config.schema import ConfigError, DiffusionConfig, RunConfig

# ldm.schedulers.FLOW_SCHEDULERS, spelled out so that loading a config does not import diffusers (a test checks that
# the two agree).
FLOW_SAMPLERS = ("flow-euler", "flow-heun")
CONSISTENCY_SAMPLER = "lcm"  # ldm.schedulers' sampler of `ldm distill` students, which no trained denoiser takes
FLOW_KEYS = ("flow_shift", "weighting_scheme", "logit_mean", "logit_std")
DDPM_KEYS = ("prediction_type", "snr_gamma")  # nullable: any value given is refused for flow
BETA_KEYS = ("beta_schedule", "beta_start", "beta_end")  # have defaults: a flow config may only leave them so

# What null means, per objective (dotted below `denoiser`). DDPM: the values these keys had before they could be null.
DEFAULTS = {
    "ddpm": {"diffusion.prediction_type": "epsilon", "sample_scheduler": "dpm++sde",
             "sample_timestep_spacing": "trailing"},
    "flow": {"diffusion.flow_shift": 1.0, "diffusion.weighting_scheme": "logit_normal", "diffusion.logit_mean": 0.0,
             "diffusion.logit_std": 1.0, "sample_scheduler": "flow-euler"},
}


def validate_objective(cfg: RunConfig) -> None:
    """A ConfigError naming the first key that does not belong to the objective, or an out-of-range flow key."""
    u = cfg.denoiser
    d = u.diffusion
    if d.objective == "flow":
        _refuse_ddpm_keys(cfg)
        for key, low in (("flow_shift", "positive (1: no shift)"), ("logit_std", "positive"), ("logit_mean", None)):
            value = getattr(d, key)
            if value is not None and not (math.isfinite(value) and (low is None or value > 0)):
                raise ConfigError(f"denoiser.diffusion.{key}: must be a finite number{', ' + low if low else ''}, "
                                  f"got {value}")
        if d.weighting_scheme == "uniform":
            for key in ("logit_mean", "logit_std"):
                if getattr(d, key) is not None:
                    raise ConfigError(f"denoiser.diffusion.{key} shapes the logit-normal density, but "
                                      "denoiser.diffusion.weighting_scheme is uniform; remove it or use logit_normal")
        return
    for key in FLOW_KEYS:
        if getattr(d, key) is not None:
            raise ConfigError(f"denoiser.diffusion.{key}={getattr(d, key)!r} is a flow-matching key, and "
                              "denoiser.diffusion.objective is ddpm; set objective: flow, or remove the key")
    if u.sample_scheduler == CONSISTENCY_SAMPLER:
        raise ConfigError(f"denoiser.sample_scheduler={u.sample_scheduler!r} samples the consistency-distilled students "
                          "of `ldm distill`, not the model trained here; choose a DDPM sampler (null: dpm++sde)")
    if u.sample_scheduler in FLOW_SAMPLERS:
        raise ConfigError(f"denoiser.sample_scheduler={u.sample_scheduler!r} samples flow-matching models, and "
                          "denoiser.diffusion.objective is ddpm; choose a DDPM sampler (null: dpm++sde), or set "
                          "objective: flow")


def _refuse_ddpm_keys(cfg: RunConfig) -> None:
    """One ConfigError naming every DDPM key a flow config sets, with the overrides that fix them all (a DDPM config
    such as configs/digits.yaml sets several, and switching it to flow on the command line should take one retry)."""
    u, d = cfg.denoiser, cfg.denoiser.diffusion
    defaults = {f.name: f.default for f in dataclasses.fields(DiffusionConfig)}
    problems, fixes = [], []
    for key, reason in (("prediction_type", "a flow model predicts the velocity ε − x"),
                        ("snr_gamma", "min-SNR weighting is defined by a DDPM noise schedule's SNR")):
        if getattr(d, key) is not None:
            problems.append(f"denoiser.diffusion.{key}={getattr(d, key)!r} ({reason})")
            fixes.append(f"--diffusion.{key}=null")
    for key in BETA_KEYS:
        if getattr(d, key) != defaults[key]:
            problems.append(f"denoiser.diffusion.{key}={getattr(d, key)!r} (a flow model has no betas: its σ is "
                            "drawn by weighting_scheme and flow_shift)")
            fixes.append(f"--diffusion.{key}={defaults[key]}")
    if u.sample_scheduler is not None and u.sample_scheduler not in FLOW_SAMPLERS:
        problems.append(f"denoiser.sample_scheduler={u.sample_scheduler!r} (it samples DDPM models; flow models take "
                        f"{' or '.join(FLOW_SAMPLERS)})")
        fixes.append("--sample_scheduler=flow-euler")
    if u.sample_timestep_spacing is not None:
        problems.append(f"denoiser.sample_timestep_spacing={u.sample_timestep_spacing!r} (flow samplers step σ "
                        "evenly through flow_shift and take no spacing)")
        fixes.append("--sample_timestep_spacing=null")
    if problems:
        raise ConfigError(f"denoiser.diffusion.objective is flow, and the config sets DDPM keys: {'; '.join(problems)}. "
                          f"Remove them from the config, or override them: {' '.join(fixes)}")


def fill_objective_defaults(cfg: RunConfig) -> None:
    """Give every null key of the objective its default (DEFAULTS), in place; the other objective's keys stay null."""
    for dotted, value in DEFAULTS[cfg.denoiser.diffusion.objective].items():
        *path, name = dotted.split(".")
        node = cfg.denoiser
        for part in path:
            node = getattr(node, part)
        if getattr(node, name) is None:
            setattr(node, name, value)
