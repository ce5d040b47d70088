"""Checks across config fields that types alone cannot express; each error names the key."""

from __future__ import annotations

from ldm.config.distill import validate_distill
from ldm.config.objective import validate_objective
from ldm.config.schema import ConfigError, RunConfig, TrainConfig

# Ranges of single values (None is always allowed where the type allows it): the networks, the optimizer and the
# loop would otherwise fail inside torch or diffusers, or loop forever, on them.
AT_LEAST_ONE = ["vae.model.layers_per_block", "vae.model.latent_channels", "vae.model.norm_num_groups",
                "denoiser.model.layers_per_block", "denoiser.model.attention_head_dim",
                "denoiser.model.norm_num_groups", "denoiser.model.sample_size", "denoiser.model.in_channels",
                "denoiser.model.patch_size", "denoiser.model.num_layers", "denoiser.model.width",
                "denoiser.model.num_attention_heads",
                "denoiser.diffusion.num_train_timesteps", "denoiser.text_model.hidden_size",
                "denoiser.text_model.num_layers", "denoiser.text_model.num_heads", "denoiser.text_model.intermediate_size",
                "denoiser.sample_steps", "denoiser.eval_num_samples", "vae.scaling_samples", "vae.loss.disc_layers",
                "data.max_samples"]
AT_LEAST_ZERO = ["data.num_workers", "vae.loss.kl_weight", "vae.loss.perceptual_weight", "vae.loss.disc_weight",
                 "vae.loss.disc_start", "denoiser.model.dropout", "denoiser.diffusion.beta_start"]
STAGE_AT_LEAST_ONE = ["num_sample_images", "log_every", "checkpoints_total_limit", "num_threads"]
STAGE_AT_LEAST_ZERO = ["lr_warmup_steps", "adam_weight_decay", "max_grad_norm", "checkpointing_steps",
                       "sample_every", "eval_every"]
BELOW_ONE = ["denoiser.model.dropout", "denoiser.diffusion.beta_end"]


def _value(cfg: RunConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate_ranges(cfg: RunConfig) -> None:
    keys = [(k, 1) for k in AT_LEAST_ONE] + [(k, 0) for k in AT_LEAST_ZERO] + [
        (f"{stage}.train.{k}", low) for stage in ("vae", "denoiser")
        for keys, low in ((STAGE_AT_LEAST_ONE, 1), (STAGE_AT_LEAST_ZERO, 0)) for k in keys]
    for key, low in keys:
        value = _value(cfg, key)
        if value is not None and value < low:
            raise ConfigError(f"{key}: must be {'positive' if low else '>= 0'}, got {value}")
    for key in BELOW_ONE:
        if _value(cfg, key) >= 1:
            raise ConfigError(f"{key}: must be below 1, got {_value(cfg, key)}")
    for stage in ("vae", "denoiser"):
        t: TrainConfig = getattr(cfg, stage).train
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(t, name) < 1.0:
                raise ConfigError(f"{stage}.train.{name}: must be in [0, 1), got {getattr(t, name)}")
        if t.adam_epsilon <= 0:
            raise ConfigError(f"{stage}.train.adam_epsilon: must be positive, got {t.adam_epsilon}")
        channels = getattr(cfg, stage).model.block_out_channels
        if not channels or min(channels) < 1:
            raise ConfigError(f"{stage}.model.block_out_channels: needs one positive entry per level, got {channels}")
    u = cfg.denoiser
    if u.diffusion.beta_end <= u.diffusion.beta_start:
        raise ConfigError(f"denoiser.diffusion.beta_end={u.diffusion.beta_end} must exceed beta_start="
                          f"{u.diffusion.beta_start}")
    if u.diffusion.snr_gamma is not None and u.diffusion.snr_gamma <= 0:
        raise ConfigError(f"denoiser.diffusion.snr_gamma: must be positive (or null), got {u.diffusion.snr_gamma}")
    for channels, attention in zip(u.model.block_out_channels, u.model.attention):
        if u.model.type == "unet" and attention and channels % u.model.attention_head_dim:
            raise ConfigError(f"denoiser.model.attention_head_dim={u.model.attention_head_dim} does not divide the "
                              f"{channels} channels of a level with attention (denoiser.model.block_out_channels)")


def validate(cfg: RunConfig) -> None:
    """Checks across fields that types alone cannot express."""
    validate_ranges(cfg)
    validate_transformer(cfg)
    d = cfg.data
    if d.source in ("folder", "hub") and not d.path:
        raise ConfigError(f"data.path: required when data.source is {d.source!r}")
    if d.resolution <= 0 or d.resolution % 8:
        raise ConfigError(f"data.resolution: must be a positive multiple of 8, got {d.resolution}")
    if not 0.0 <= d.holdout_fraction < 1.0:
        raise ConfigError(f"data.holdout_fraction: must be in [0, 1), got {d.holdout_fraction}")
    vm = cfg.vae.model
    factor = 2 ** (len(vm.block_out_channels) - 1)
    validate_pretrained(cfg)
    if cfg.vae.pretrained is None and d.resolution % factor:  # a pretrained autoencoder's factor: ldm.pretrained_vae
        raise ConfigError(
            f"vae.model.block_out_channels: {len(vm.block_out_channels)} levels downsample by {factor}, "
            f"which does not divide data.resolution={d.resolution}"
        )
    sized = [("vae.model", vm.block_out_channels, vm.norm_num_groups)]
    if cfg.denoiser.model.type == "unet":  # a DiT has no levels: its UNet keys size nothing
        sized.append(("denoiser.model", cfg.denoiser.model.block_out_channels, cfg.denoiser.model.norm_num_groups))
    for name, channels, groups in sized:
        bad = [c for c in channels if c % groups]
        if bad:
            raise ConfigError(f"{name}.norm_num_groups={groups} does not divide block_out_channels entry {bad[0]}")
    um = cfg.denoiser.model
    if um.type == "unet" and len(um.attention) != len(um.block_out_channels):
        raise ConfigError(
            f"denoiser.model.attention: needs one entry per level ({len(um.block_out_channels)}), got "
            f"{len(um.attention)}"
        )
    if cfg.vae.loss.perceptual_weight > 0 and not cfg.vae.loss.lpips_weights:
        raise ConfigError(
            "vae.loss.perceptual_weight > 0 needs vae.loss.lpips_weights: a safetensors file with the LPIPS "
            "VGG16 weights (see README, 'Perceptual loss'); or set vae.loss.perceptual_weight=0"
        )
    for name in ("disc_start", "ssim_weight", "spectral_weight", "chroma_weight"):
        if getattr(cfg.vae.loss, name) < 0:
            raise ConfigError(f"vae.loss.{name}: must be >= 0, got {getattr(cfg.vae.loss, name)}")
    if cfg.vae.loss.chroma_block is not None and cfg.vae.loss.chroma_block < 1:
        raise ConfigError(f"vae.loss.chroma_block: a block size in pixels (>= 1) or null for the autoencoder's "
                          f"downsampling factor, got {cfg.vae.loss.chroma_block}")
    if cfg.vae.eval_metric in ("rfid", "recall") and not cfg.vae.eval_features:
        raise ConfigError(f"vae.eval_metric={cfg.vae.eval_metric} needs vae.eval_features: a classifier folder from "
                          "`ldm train-classifier`; or pick psnr or ssim")
    validate_conditioning(cfg)
    validate_superres(cfg)
    validate_objective(cfg)
    validate_run_budget(cfg)
    for stage in ("vae", "denoiser"):
        t: TrainConfig = getattr(cfg, stage).train
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_bad_steps"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"{stage}.train.{name}: must be positive, got {getattr(t, name)}")
        if t.max_minutes is not None and t.max_minutes <= 0:
            raise ConfigError(f"{stage}.train.max_minutes: must be positive (or null for no budget), got {t.max_minutes}")
        if t.budget_probe_steps <= 0:
            raise ConfigError(f"{stage}.train.budget_probe_steps: must be positive, got {t.budget_probe_steps}")
        if t.learning_rate <= 0:
            raise ConfigError(f"{stage}.train.learning_rate: must be positive, got {t.learning_rate}")
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"{stage}.train.ema_decay: must be in [0, 1), got {t.ema_decay}")
    validate_posthoc_ema(cfg)
    validate_distill(cfg)


def validate_run_budget(cfg: RunConfig) -> None:
    """The `budget` section (one time budget for both stages: ldm.train.run_budget)."""
    b = cfg.budget
    if b.max_minutes is not None and b.max_minutes <= 0:
        raise ConfigError(f"budget.max_minutes: must be positive (or null for no total budget), got {b.max_minutes}")
    if b.vae_min_gain_db < 0:
        raise ConfigError(f"budget.vae_min_gain_db: must be >= 0 (dB per tenth of the budget), got {b.vae_min_gain_db}")
    if not 0.0 < b.vae_min_share <= b.vae_max_share < 1.0:
        raise ConfigError(f"budget.vae_min_share and budget.vae_max_share: need 0 < min <= max < 1 (the denoiser gets "
                          f"at least 1 - max), got {b.vae_min_share} and {b.vae_max_share}")
    if not 0.0 <= b.vae_decay_share < 1.0:
        raise ConfigError(f"budget.vae_decay_share: must be in [0, 1), got {b.vae_decay_share}")


def validate_posthoc_ema(cfg: RunConfig) -> None:
    """train.ema_posthoc and its keys (ldm.train.posthoc_ema): the denoiser's only."""
    if cfg.vae.train.ema_posthoc:
        raise ConfigError("vae.train.ema_posthoc: post-hoc EMA is built for the denoiser stage (its snapshots are "
                          "reconstructed into pipelines: ldm ema-reconstruct); set denoiser.train.ema_posthoc instead")
    t = cfg.denoiser.train
    widths = t.ema_posthoc_sigma_rels
    if not widths or any(not 0.0 < s < 0.289 for s in widths):
        raise ConfigError(f"denoiser.train.ema_posthoc_sigma_rels: needs one or more widths in (0, 0.289) (EDM2: "
                          f"[0.05, 0.10]), got {widths}")
    if len({f"{s:.3f}" for s in widths}) != len(widths):
        raise ConfigError(f"denoiser.train.ema_posthoc_sigma_rels: widths must differ at 3 decimals (they name the "
                          f"snapshot files), got {widths}")
    if t.ema_posthoc_every < 1:
        raise ConfigError(f"denoiser.train.ema_posthoc_every: must be positive, got {t.ema_posthoc_every}")
    if t.ema_posthoc_max_snapshots < 2:
        raise ConfigError(f"denoiser.train.ema_posthoc_max_snapshots: must be at least 2 (the reconstruction needs "
                          f"snapshots spread over the run), got {t.ema_posthoc_max_snapshots}")


def validate_conditioning(cfg: RunConfig) -> None:
    """Conditioning keys that only make sense together (whether the data has labels or captions is checked when it
    is loaded)."""
    u, d = cfg.denoiser, cfg.data
    if not 0.0 <= u.diffusion.cond_dropout < 1.0:
        raise ConfigError(f"denoiser.diffusion.cond_dropout: must be in [0, 1), got {u.diffusion.cond_dropout}")
    if u.guidance_scale < 0:
        raise ConfigError(f"denoiser.guidance_scale: must be >= 0, got {u.guidance_scale}")
    if u.conditioning != "none" and u.diffusion.cond_dropout == 0 and u.guidance_scale != 1:
        # Guidance extrapolates from the null class / empty prompt, which a model trained without condition dropout
        # never saw: every grid, evaluation and unet/best/ choice would rest on an untrained branch.
        raise ConfigError(
            f"denoiser.diffusion.cond_dropout=0 with denoiser.conditioning={u.conditioning!r} trains no unconditional "
            f"branch, but denoiser.guidance_scale={u.guidance_scale:g} guides with it: set cond_dropout > 0 (0.1 is "
            "usual) for classifier-free guidance, or denoiser.guidance_scale: 1 to sample the conditional model alone")
    if d.caption_column and d.caption_template:
        raise ConfigError("data.caption_column and data.caption_template are both set; captions come from one of them")
    if d.caption_template is not None and "{name}" not in d.caption_template:
        raise ConfigError(f"data.caption_template={d.caption_template!r} has no {{name}} field for the class name")
    if u.conditioning == "text" and d.source == "digits" and not d.caption_template:
        raise ConfigError("denoiser.conditioning=text needs captions, and the digits have none: set "
                          "data.caption_template, e.g. 'a handwritten digit {name}'")
    if u.conditioning != "text" and u.text_encoder:
        raise ConfigError(f"denoiser.text_encoder is set but denoiser.conditioning={u.conditioning!r}; set "
                          "conditioning: text")
    t = u.text_model
    if t.hidden_size % t.num_heads:
        raise ConfigError(f"denoiser.text_model.num_heads={t.num_heads} does not divide hidden_size={t.hidden_size}")
    if t.max_length < 3:
        raise ConfigError(f"denoiser.text_model.max_length: needs room for start, end and one token, got "
                          f"{t.max_length}")


def validate_superres(cfg: RunConfig) -> None:
    """denoiser.task=superres and data.degrade."""
    g, u = cfg.data.degrade, cfg.denoiser
    if g.factor < 1 or cfg.data.resolution % g.factor:
        raise ConfigError(f"data.degrade.factor: must be a positive divisor of data.resolution={cfg.data.resolution}, "
                          f"got {g.factor}")
    if g.blur_sigma < 0 or g.noise_std < 0:
        raise ConfigError("data.degrade.blur_sigma and data.degrade.noise_std: must be >= 0")
    if u.task == "superres":
        if u.conditioning != "none":
            raise ConfigError(f"denoiser.task=superres is conditioned on the low-res image alone; "
                              f"denoiser.conditioning={u.conditioning!r} must be none")
        if u.train.eval_every:
            raise ConfigError("denoiser.train.eval_every: not available with denoiser.task=superres; measure the "
                              "trained model with `ldm eval --task superres`")


def validate_pretrained(cfg: RunConfig) -> None:
    """vae.pretrained and the keys that only mean something with it (the autoencoder itself is checked by
    ldm.pretrained_vae.check_pretrained, before any download)."""
    v = cfg.vae
    if v.pretrained is None:
        for name, unset in (("pretrained_subfolder", None), ("pretrained_revision", None), ("finetune", "none")):
            if getattr(v, name) != unset:
                raise ConfigError(f"vae.{name}={getattr(v, name)!r} needs vae.pretrained: a published AutoencoderKL "
                                  "(Hub id or folder); an autoencoder trained here is trained whole")
        if v.latent_stats == "config":
            raise ConfigError("vae.latent_stats=config keeps a publisher's scaling_factor, but vae.pretrained is not "
                              "set: an autoencoder trained here always has its latents measured")
    elif not v.pretrained.strip():
        raise ConfigError("vae.pretrained: empty; give a Hub id (e.g. stabilityai/sd-vae-ft-mse) or a folder")


# The keys that size one backbone and mean nothing to the other (type, dropout, sample_size, in_channels: both).
UNET_KEYS = ("block_out_channels", "attention", "layers_per_block", "attention_head_dim", "norm_num_groups")
DIT_KEYS = ("patch_size", "num_layers", "width", "num_attention_heads", "stock_pipeline")


def validate_transformer(cfg: RunConfig) -> None:
    """denoiser.model.type=dit: the transformer's sizes, and what diffusers' DiTPipeline can load (the latent size
    and the autoencoder's shift are known only once the VAE is loaded: ldm.models.checked_latent_shape and
    ldm.train.conditioning.stock_dit)."""
    m, u = cfg.denoiser.model, cfg.denoiser
    if m.type != "dit":
        return
    if m.width % m.num_attention_heads:
        raise ConfigError(f"denoiser.model.num_attention_heads={m.num_attention_heads} does not divide "
                          f"denoiser.model.width={m.width}; each head takes width / heads channels")
    if m.width % 4:
        # The fixed 2-D sine-cosine position embedding gives a quarter of the channels to each of sin/cos of x/y.
        raise ConfigError(f"denoiser.model.width={m.width}: must be a multiple of 4 (the 2-D sine-cosine position "
                          "embedding splits it into four quarters)")
    if m.sample_size is not None and m.sample_size % m.patch_size:
        raise ConfigError(f"denoiser.model.patch_size={m.patch_size} does not divide the {m.sample_size}x"
                          f"{m.sample_size} latents (denoiser.model.sample_size); use a divisor of it")
    if m.stock_pipeline and (u.conditioning != "class" or u.task != "generate"):
        raise ConfigError(f"denoiser.model.stock_pipeline=true: diffusers' DiTPipeline samples class-conditional "
                          f"models only, and this one is {u.conditioning!r}-conditioned with task={u.task!r}; set "
                          "denoiser.conditioning=class, or leave stock_pipeline null")
    if m.stock_pipeline and u.diffusion.objective == "flow":
        raise ConfigError("denoiser.model.stock_pipeline=true with denoiser.diffusion.objective=flow: diffusers' "
                          "DiTPipeline samples DDPM models (it calls the scheduler's scale_model_input, which the "
                          "flow samplers lack); leave stock_pipeline null for a flow model")
    if m.stock_pipeline and u.sample_scheduler in ("euler", "euler-a"):
        raise ConfigError(f"denoiser.sample_scheduler={u.sample_scheduler} starts sampling from noise of std sigma_max, "
                          "and diffusers' DiTPipeline from unit noise, so with denoiser.model.stock_pipeline=true the "
                          "saved folder could not be a DiTPipeline one: choose ddim, dpm++, dpm++sde, unipc or ddpm")


def validate_backbone_overrides(cfg: RunConfig, overrides: dict) -> None:
    """A command-line key of the backbone that denoiser.model.type does not pick: an error, not a silent no-op
    (a file may size both backbones, so only overrides are checked)."""
    unused = {"unet": DIT_KEYS, "dit": UNET_KEYS}[cfg.denoiser.model.type]
    for key in overrides:
        head, _, name = key.rpartition(".")
        if head in ("denoiser.model", "unet.model") and name in unused:
            used = {"unet": UNET_KEYS, "dit": DIT_KEYS}[cfg.denoiser.model.type]
            raise ConfigError(f"denoiser.model.{name} sizes the {'unet' if name in UNET_KEYS else 'dit'} backbone, "
                              f"but denoiser.model.type={cfg.denoiser.model.type}: its keys are "
                              f"{', '.join(used)}; drop the override or set --denoiser.model.type")
