"""Typed run configuration: dataclasses with one comment per field, YAML files mapped onto them, dotted overrides.

A config file holds both stages of a run (`vae` and `unet`) plus the data they share, so that
`train_vae.py --config X` and `train_unet.py --config X` train the two halves of one model. Unknown keys and
wrong types fail before any work with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    source: Literal["digits", "folder", "hub"] = "digits"  # digits: scikit-learn's bundled set; folder: images on disk; hub: datasets.load_dataset
    path: str | None = None  # folder: directory of images (class = sub-folder); hub: data set name or local data directory
    hub_config: str | None = None  # hub: the data set's configuration name, if it has several
    split: str = "train"  # hub: which split to train on
    image_column: str = "image"  # hub: column holding the images
    label_column: str | None = None  # hub: column holding integer class labels (null: unlabelled)
    streaming: bool = False  # hub: iterate without downloading the whole set first
    resolution: int = 32  # images are resized (shorter side) and cropped to resolution x resolution
    crop: Literal["center", "random"] = "center"  # how the square is cut after resizing
    random_flip: bool = False  # flip horizontally with p=0.5 (augmentation; off for digits, which are not symmetric)
    color_mode: Literal["rgb", "grayscale"] = "rgb"  # rgb -> 3 channels, grayscale -> 1 channel
    holdout_fraction: float = 0.05  # share of images kept out of training to measure reconstruction quality
    max_samples: int | None = None  # cap on the number of training images (null: all)
    verify_images: bool = True  # decode-check every image file before training, so a broken file fails in seconds
    num_workers: int = 0  # DataLoader worker processes
    caption_column: str | None = None  # text conditioning: column holding each image's caption (hub; folder: a metadata.jsonl/csv column, default "text")
    caption_template: str | None = None  # text conditioning on labelled data: caption = template.format(name=class name), e.g. "a handwritten digit {name}"
    seed: int = 0  # decides the train/held-out split and the random crops/flips, the same for both stages, evaluation and the latent cache


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps (after gradient accumulation)
    batch_size: int = 32  # per device; global batch = batch_size x processes x gradient_accumulation_steps
    gradient_accumulation_steps: int = 1  # micro-batches summed before each optimizer step
    learning_rate: float = 1e-4  # peak AdamW learning rate
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "cosine"  # shape of the LR after warm-up (diffusers.optimization.get_scheduler)
    lr_warmup_steps: int = 0  # linear warm-up from 0 to learning_rate
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.999  # AdamW second-moment decay
    adam_weight_decay: float = 0.0  # decoupled weight decay
    adam_epsilon: float = 1e-8  # AdamW denominator epsilon
    max_grad_norm: float = 1.0  # gradient clipping by global norm (0 disables)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast dtype for the forward pass
    seed: int = 0  # seeds this stage's weights, data order and noise (the split and augmentation follow data.seed)
    use_ema: bool = True  # keep an exponential moving average of the weights; it is what gets saved
    ema_decay: float = 0.9999  # EMA decay ceiling
    ema_warmup: bool = True  # ramp the EMA decay up from 0 (diffusers' use_ema_warmup), so short runs are not all init
    checkpointing_steps: int = 500  # save the full training state every N steps (0 disables)
    checkpoints_total_limit: int | None = 3  # keep only the newest N checkpoints (null: keep all)
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint directory to continue from
    sample_every: int = 500  # write a sample grid every N steps (0 disables)
    eval_every: int = 0  # UNet stage: every N steps score samples of the EMA weights (unet.eval_*), keep the best as unet/best/ (0 disables)
    num_sample_images: int = 16  # images in each sample grid
    log_every: int = 10  # log loss, LR, grad norm and speed every N steps
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"  # accelerate tracker
    cpu: bool = False  # train on the CPU even if a GPU is present (multi-process runs then use DDP over gloo); set automatically for multi-process launches on a machine without GPUs
    num_threads: int | None = None  # CPU only: torch threads per process (null: cores / processes on this machine; accelerate launch alone would pin 1)
    allow_tf32: bool = True  # CUDA only: fp32 matmuls and convolutions may use TF32 tensor cores (Ampere+; ~10-bit mantissa products)
    channels_last: bool = True  # CUDA only: keep the trained networks (and the UNet stage's frozen VAE) in NHWC layout, which tensor-core convolutions prefer
    compile: bool = False  # torch.compile the trained networks (accelerate's inductor backend): slow first steps, faster later ones
    gradient_checkpointing: bool = False  # recompute activations during backward (diffusers enable_gradient_checkpointing): less memory, ~30% more compute


@dataclass
class VAEModelConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])  # one entry per level; downsampling f = 2^(levels-1)
    layers_per_block: int = 2  # ResNet blocks per level
    latent_channels: int = 4  # channels of the latent space
    norm_num_groups: int = 32  # GroupNorm groups (must divide every entry of block_out_channels)


@dataclass
class VAELossConfig:
    reconstruction: Literal["l1", "l2"] = "l1"  # pixel reconstruction loss
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)); small, as in the LDM paper's KL-regularised autoencoders
    perceptual_weight: float = 0.0  # weight of the LPIPS term (LDM: 1.0); needs lpips_weights
    lpips_weights: str | None = None  # safetensors file with the LPIPS VGG16 trunk and linear heads
    disc_weight: float = 0.0  # weight of the patch-GAN generator term (LDM: 0.5; 0 disables the discriminator)
    disc_start: int = 50001  # step at which the discriminator starts (LDM: 50001)
    disc_layers: int = 3  # conv layers of the patch discriminator
    disc_learning_rate: float | None = None  # discriminator LR (null: same as the autoencoder's)


@dataclass
class VAEStageConfig:
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling_samples: int = 1024  # training images encoded to measure the latents' std (scaling_factor = 1/std)
    eval_features: str | None = None  # classifier folder (`ldm train-classifier`) for the held-out rFID printed at the end (null: PSNR/SSIM only)


@dataclass
class UNetModelConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 256])  # channels per resolution level
    attention: list[bool] = field(default_factory=lambda: [False, True, True])  # self-attention at each level
    layers_per_block: int = 2  # ResNet blocks per level
    attention_head_dim: int = 32  # channels per attention head
    norm_num_groups: int = 32  # GroupNorm groups
    dropout: float = 0.0  # dropout inside ResNet blocks
    sample_size: int | None = None  # latent height/width (null: taken from the VAE; if set, must match it)
    in_channels: int | None = None  # latent channels (null: taken from the VAE; if set, must match it)


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000  # T of the forward process
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"  # LDM's "linear" is diffusers' scaled_linear
    beta_start: float = 0.0015  # LDM's linear_start
    beta_end: float = 0.0195  # LDM's linear_end
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # what the UNet is trained to predict
    snr_gamma: float | None = None  # min-SNR loss weighting gamma (Hang et al. 2023; 5.0 is typical; null: off)
    cond_dropout: float = 0.1  # conditional models: share of training examples whose condition is replaced by the null class / empty caption, so classifier-free guidance can sample the unconditional branch (Ho & Salimans 2022)


@dataclass
class TextModelConfig:
    """The CLIPTextModel trained from scratch with the UNet when unet.text_encoder is null (CLIP's layout, smaller)."""

    hidden_size: int = 128  # width of the transformer; also the UNet's cross_attention_dim
    num_layers: int = 2  # transformer layers
    num_heads: int = 4  # attention heads (must divide hidden_size)
    intermediate_size: int = 512  # width of each layer's MLP
    max_length: int = 77  # tokens per caption including start/end (CLIP: 77); longer captions are truncated with a warning
    vocab_size: int = 4096  # upper bound of the BPE vocabulary built from the training captions (256 bytes x 2 + merges + 2)


@dataclass
class UNetStageConfig:
    model: UNetModelConfig = field(default_factory=UNetModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vae_path: str | None = None  # trained VAE directory (null: <output_dir>/vae/model)
    latent_cache: bool = True  # encode the training images once (posterior mean + logvar on disk), not every step
    latent_cache_dir: str | None = None  # where cached latents live, keyed by VAE weights + data (null: <output_dir>/latent_cache)
    sample_scheduler: Literal["ddpm", "ddim", "dpm++", "dpm++sde", "unipc", "euler", "euler-a"] = "ddim"  # scheduler of the saved pipeline and of the sample grids (ldm.schedulers)
    sample_timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"  # which training timesteps its steps visit (ldm.schedulers; saved with the pipeline)
    sample_steps: int = 50  # denoising steps for sample grids and evaluation during training
    eval_features: str | None = None  # classifier folder (`ldm train-classifier`) for evaluation during training (null: Inception, if available)
    eval_num_samples: int = 256  # samples per evaluation during training (sample_scheduler, sample_steps)
    eval_metric: Literal["fid", "kid", "is", "pr"] = "fid"  # the metric logged as eval/* and used to pick unet/best/ (pr: precision)
    vae_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the frozen VAE here (float16 decoding overflows on real models; the UNet always gets float32 latents)
    conditioning: Literal["none", "class", "text"] = "none"  # none: unconditional; class: class labels with classifier-free guidance (needs labels); text: captions through a text encoder and cross-attention (needs captions)
    text_encoder: str | None = None  # text: a pretrained CLIPTextModel or T5EncoderModel with its tokenizer (Hub id or folder), kept frozen, prompt embeddings cached; null: train text_model from scratch
    text_model: TextModelConfig = field(default_factory=TextModelConfig)  # text with text_encoder null: sizes of the from-scratch CLIPTextModel
    guidance_scale: float = 3.0  # class/text: classifier-free guidance scale of the sample grids and evaluations during training (1: conditional branch only)


@dataclass
class RunConfig:
    output_dir: str = "runs/digits"  # everything of the run goes here: vae/, unet/, pipeline/
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    unet: UNetStageConfig = field(default_factory=UNetStageConfig)


# --------------------------------------------------------------------------------------------------------------------
# Mapping plain data (YAML, overrides) onto the dataclasses, with errors that name the key.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


# YAML 1.1 (PyYAML) reads `no` as False and `5e-4` as a string; scalars are therefore read as text
# (yaml.BaseLoader) and parsed here by the type of the field they go into.
_NULL = {"null", "Null", "NULL", "~", ""}
_TRUE, _FALSE = {"true", "yes", "on"}, {"false", "no", "off"}


def _parse_text(text: str, tp: Any) -> Any:
    """`text` as a value of the scalar type `tp` (int, float, bool, None); raises ValueError if it is not one."""
    if tp is type(None) and text in _NULL:
        return None
    if tp is bool and text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    if tp is int:
        return int(text)
    if tp is float:
        value = float(text)
        # Python's float() also reads "nan" and "inf", which no field of ours accepts as a value.
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    raise ValueError(text)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it in that type.

    Text (from YAML files and command-line overrides) is parsed by the field's type: "5e-4" for a float, "50" for
    an int, true/false/yes/no/on/off for a bool, null/~ for an optional field; "no" for a str or Literal field
    stays "no". Python values are accepted as they are (ints for floats too).
    """
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value in _NULL)):
            return None  # before str: `null` in an optional path field means "not set", not a file called null
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if isinstance(value, str):  # an override such as --unet.model.attention=[true,false]
            value = _read_text(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and tp is not str:
        try:
            return _parse_text(value.strip(), tp)
        except ValueError:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}") from None
    if tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _read_text(text: str) -> Any:
    """YAML structure (mappings, lists) with every scalar kept as text, for `_coerce` to parse by field type."""
    try:
        return yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read {text!r} as YAML: {e}") from e


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}"
        )
    values = {name: _coerce(data[name], hints[name], f"{prefix}{name}") for name in data}
    return cls(**values)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override --{dotted_key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _stage_keys(stage: str) -> set[str]:
    stage_cls = {"vae": VAEStageConfig, "unet": UNetStageConfig}[stage]
    return {f.name for f in dataclasses.fields(stage_cls)} - {f.name for f in dataclasses.fields(RunConfig)}


def parse_overrides(args: list[str], stage: str | None = None) -> dict[str, Any]:
    """Turn `--a.b=1` / `--a.b 1` arguments into {"a.b": 1}; each value is parsed by the type of its field
    (`--train.learning_rate=5e-4` is a float, `--train.mixed_precision=no` the string "no"); keys that are not
    fields are kept as text for `load_config` to reject by name.

    Inside the script that trains `stage`, keys of that stage may drop the prefix: `--train.max_steps=50` means
    `--vae.train.max_steps=50` in train_vae.py and `--unet.train.max_steps=50` in train_unet.py.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --train.max_steps=50")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override --{body} has no value; write --{body}=VALUE")
        if stage is not None and key.split(".")[0] in _stage_keys(stage):
            key = f"{stage}.{key}"
        field_type = _field_type(key)
        overrides[key] = raw if field_type is None else _coerce(raw, field_type, key)
        i += 1
    return overrides


def _field_type(dotted_key: str) -> Any:
    """The annotation of RunConfig's field at `dotted_key` (e.g. "unet.train.seed" -> int), None if there is none."""
    tp: Any = RunConfig
    for part in dotted_key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return None if dataclasses.is_dataclass(tp) else tp


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults), apply dotted overrides, and validate the result."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = _read_text(path.read_text()) or {}
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data, vae, unet, ...)")
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    cfg = from_dict(RunConfig, tree)
    validate(cfg)
    return cfg


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
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
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


def save_config(cfg: RunConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def config_from_argv(argv: list[str], stage: str) -> tuple[RunConfig, bool]:
    """Parse a training script's command line: --config FILE, --output_dir DIR, --dry_run, dotted overrides.

    Returns the validated config and whether this is a dry run (print the resolved config and stop).
    """
    import argparse

    parser = argparse.ArgumentParser(
        description=f"Train the {stage.upper()} stage of a latent diffusion model.",
        epilog="Any config key can be overridden: --data.resolution=64 --train.max_steps=50 (--train.* and other "
        f"{stage}-stage keys may drop the '{stage}.' prefix).",
    )
    parser.add_argument("--config", help="YAML config file (default: built-in defaults = digits)")
    parser.add_argument("--output_dir", help="run directory (overrides output_dir in the config)")
    parser.add_argument("--dry_run", action="store_true", help="print the resolved config and exit")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest, stage=stage)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    return load_config(args.config, overrides), args.dry_run
