"""Checks across config fields that types alone cannot express; each error names the key."""

from __future__ import annotations

from ldm.config.schema import ConfigError, RunConfig, TrainConfig


def validate(cfg: RunConfig) -> None:
    """Checks across fields that types alone cannot express."""
    d = cfg.data
    if d.source in ("folder", "hub") and not d.path:
        raise ConfigError(f"data.path: required when data.source is {d.source!r}")
    if d.resolution <= 0 or d.resolution % 8:
        raise ConfigError(f"data.resolution: must be a positive multiple of 8, got {d.resolution}")
    if not 0.0 <= d.holdout_fraction < 1.0:
        raise ConfigError(f"data.holdout_fraction: must be in [0, 1), got {d.holdout_fraction}")
    vm = cfg.vae.model
    factor = 2 ** (len(vm.block_out_channels) - 1)
    if d.resolution % factor:
        raise ConfigError(
            f"vae.model.block_out_channels: {len(vm.block_out_channels)} levels downsample by {factor}, "
            f"which does not divide data.resolution={d.resolution}"
        )
    for name, channels, groups in (
        ("vae.model", vm.block_out_channels, vm.norm_num_groups),
        ("unet.model", cfg.unet.model.block_out_channels, cfg.unet.model.norm_num_groups),
    ):
        bad = [c for c in channels if c % groups]
        if bad:
            raise ConfigError(f"{name}.norm_num_groups={groups} does not divide block_out_channels entry {bad[0]}")
    um = cfg.unet.model
    if len(um.attention) != len(um.block_out_channels):
        raise ConfigError(
            f"unet.model.attention: needs one entry per level ({len(um.block_out_channels)}), got {len(um.attention)}"
        )
    if cfg.vae.loss.perceptual_weight > 0 and not cfg.vae.loss.lpips_weights:
        raise ConfigError(
            "vae.loss.perceptual_weight > 0 needs vae.loss.lpips_weights: a safetensors file with the LPIPS "
            "VGG16 weights (see README, 'Perceptual loss'); or set vae.loss.perceptual_weight=0"
        )
    validate_conditioning(cfg)
    for stage in ("vae", "unet"):
        t: TrainConfig = getattr(cfg, stage).train
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_bad_steps"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"{stage}.train.{name}: must be positive, got {getattr(t, name)}")
        if t.learning_rate <= 0:
            raise ConfigError(f"{stage}.train.learning_rate: must be positive, got {t.learning_rate}")
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"{stage}.train.ema_decay: must be in [0, 1), got {t.ema_decay}")


def validate_conditioning(cfg: RunConfig) -> None:
    """Conditioning keys that only make sense together (whether the data has labels or captions is checked when it
    is loaded)."""
    u, d = cfg.unet, cfg.data
    if not 0.0 <= u.diffusion.cond_dropout < 1.0:
        raise ConfigError(f"unet.diffusion.cond_dropout: must be in [0, 1), got {u.diffusion.cond_dropout}")
    if u.guidance_scale < 0:
        raise ConfigError(f"unet.guidance_scale: must be >= 0, got {u.guidance_scale}")
    if d.caption_column and d.caption_template:
        raise ConfigError("data.caption_column and data.caption_template are both set; captions come from one of them")
    if d.caption_template is not None and "{name}" not in d.caption_template:
        raise ConfigError(f"data.caption_template={d.caption_template!r} has no {{name}} field for the class name")
    if u.conditioning == "text" and d.source == "digits" and not d.caption_template:
        raise ConfigError("unet.conditioning=text needs captions, and the digits have none: set data.caption_template, "
                          "e.g. 'a handwritten digit {name}'")
    if u.conditioning != "text" and u.text_encoder:
        raise ConfigError(f"unet.text_encoder is set but unet.conditioning={u.conditioning!r}; set conditioning: text")
    t = u.text_model
    if t.hidden_size % t.num_heads:
        raise ConfigError(f"unet.text_model.num_heads={t.num_heads} does not divide hidden_size={t.hidden_size}")
    if t.max_length < 3:
        raise ConfigError(f"unet.text_model.max_length: needs room for start, end and one token, got {t.max_length}")
