"""A published autoencoder as stage 1 (`vae.pretrained`): find it, check it fits the data, load it, adapt it.

Any diffusers `AutoencoderKL` serves: the 4-channel SD 1.x/2.x and SDXL ones, the 16-channel SD3/FLUX ones with a
`shift_factor`. Everything that can be wrong with one is found from the repository's file list and its small
config.json, before the weights are downloaded, and raised as a ConfigError naming the key to change:

  1. where it is: a local folder, or a Hub id (the Hub's answer in one line when it refuses: missing, gated, private,
     offline and not cached);
  2. what it is: an AutoencoderKL config under `vae.pretrained_subfolder` (a full pipeline: which subfolder to set);
  3. its weights: safetensors only (pickled `.bin`/`.ckpt` weights are refused, never unpickled);
  4. shapes: the downsampling factor f = 2^(levels - 1) must divide data.resolution (the network is fully
     convolutional: its `sample_size` says nothing about the images it can take); an RGB autoencoder takes
     grayscale data by `to_grayscale`, other channel mismatches are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ldm.config import ConfigError, RunConfig
from ldm.hub import HubError, download_file, download_files, repo_files

WEIGHTS = "diffusion_pytorch_model.safetensors"
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PICKLED = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# A measured mean is stored as shift_factor when it is at least this many standard deviations away from zero, or
# when the publisher used a shift. A smaller offset changes nothing the UNet would notice, and keeping shift_factor
# None keeps a 4-channel SD-family model exportable as a stock StableDiffusionPipeline (which never adds it back).
SHIFT_MIN_STDS = 0.1


@dataclass
class PretrainedSource:
    """Where a checked pretrained autoencoder lies, and what its config says."""

    name: str  # vae.pretrained as given
    subfolder: str  # "" for the repository's root
    revision: str | None
    local: Path | None  # a local folder (None: a Hub id)
    weights: list[str]  # the safetensors files to download, relative to the repository root
    config: dict  # its config.json

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def describe(self) -> str:
        where = f"{self.name}" + (f", subfolder {self.subfolder}" if self.subfolder else "")
        return where + (f", revision {self.revision}" if self.revision else "")


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def _list_files(cfg: RunConfig) -> tuple[Path | None, list[str]]:
    v = cfg.vae
    if _is_local(v.pretrained):
        folder = Path(v.pretrained).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"vae.pretrained={v.pretrained!r}: no such folder (a Hub id looks like owner/name)")
        if v.pretrained_revision:
            raise ConfigError(f"vae.pretrained_revision is for Hub ids; vae.pretrained={v.pretrained!r} is a folder")
        return folder, sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    try:
        return None, repo_files(v.pretrained, v.pretrained_revision)
    except HubError as e:
        raise ConfigError(f"vae.pretrained={v.pretrained!r}: the Hub answered: {e}") from e


def _read_json(cfg: RunConfig, local: Path | None, path: str) -> dict:
    if local is not None:
        return json.loads((local / path).read_text())
    try:
        return json.loads(download_file(cfg.vae.pretrained, cfg.vae.pretrained_revision, path).read_text())
    except HubError as e:
        raise ConfigError(f"vae.pretrained={cfg.vae.pretrained!r}: reading {path}, the Hub answered: {e}") from e


def _autoencoder_subfolders(cfg: RunConfig, local: Path | None, files: list[str]) -> list[str]:
    """Subfolders that a pipeline's model_index.json names as an AutoencoderKL."""
    if "model_index.json" not in files:
        return []
    index = _read_json(cfg, local, "model_index.json")
    return [k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1] == "AutoencoderKL"]


def _weights(cfg: RunConfig, local: Path | None, files: list[str], prefix: str) -> list[str]:
    """The safetensors weights under `prefix` (one file, or an index and its shards); refuses pickled ones."""
    here = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
    if WEIGHTS in here:
        return [prefix + WEIGHTS]
    if SHARD_INDEX in here:
        shards = sorted(set(_read_json(cfg, local, prefix + SHARD_INDEX)["weight_map"].values()))
        return [prefix + SHARD_INDEX] + [prefix + s for s in shards]
    pickled = [f for f in here if f.endswith(PICKLED)]
    where = f"vae.pretrained={cfg.vae.pretrained!r}" + (f" (subfolder {prefix[:-1]})" if prefix else "")
    if pickled:
        raise ConfigError(f"{where} has only pickled weights ({', '.join(pickled)}); ldm loads safetensors only and "
                          "never unpickles a download: pick a revision with diffusion_pytorch_model.safetensors "
                          "(vae.pretrained_revision), or convert the weights yourself and point to that folder")
    raise ConfigError(f"{where} has no {WEIGHTS} beside its config.json")


def check_pretrained(cfg: RunConfig, num_channels: int) -> PretrainedSource:
    """Every check of the module docstring, from the file list and config.json alone (no weights downloaded)."""
    v = cfg.vae
    local, files = _list_files(cfg)
    subfolder = (v.pretrained_subfolder or "").strip("/")
    prefix = f"{subfolder}/" if subfolder else ""
    if prefix + "config.json" not in files:
        found = _autoencoder_subfolders(cfg, local, files) if not subfolder else []
        hint = (f"it is a full pipeline: set vae.pretrained_subfolder: {found[0]}" if found else
                "set vae.pretrained_subfolder to the folder holding the AutoencoderKL's config.json")
        raise ConfigError(f"vae.pretrained={v.pretrained!r} has no AutoencoderKL at "
                          f"{prefix + 'config.json'!r}; {hint}")
    config = _read_json(cfg, local, prefix + "config.json")
    if config.get("_class_name") != "AutoencoderKL":
        found = _autoencoder_subfolders(cfg, local, files)
        hint = f"; set vae.pretrained_subfolder: {found[0]}" if found else ""
        raise ConfigError(f"vae.pretrained={v.pretrained!r}{f' (subfolder {subfolder})' if subfolder else ''} holds "
                          f"a {config.get('_class_name')}, not an AutoencoderKL{hint}")
    source = PretrainedSource(v.pretrained, subfolder, v.pretrained_revision, local,
                              _weights(cfg, local, files, prefix), config)
    f = source.downsampling_factor
    if cfg.data.resolution % f:
        raise ConfigError(f"data.resolution={cfg.data.resolution} is not divisible by the downsampling factor f={f} "
                          f"of vae.pretrained={v.pretrained!r}; use a multiple of {f}")
    channels = config.get("in_channels", 3)
    if channels != num_channels and not (channels == 3 and num_channels == 1):
        raise ConfigError(f"vae.pretrained={v.pretrained!r} takes {channels}-channel images but the data gives "
                          f"{num_channels}: set data.color_mode: {'grayscale' if channels == 1 else 'rgb'}")
    return source


def load(source: PretrainedSource) -> AutoencoderKL:
    """Download (Hub ids: config.json and the safetensors weights only) and load the autoencoder."""
    folder = source.local
    if folder is None:
        prefix = f"{source.subfolder}/" if source.subfolder else ""
        try:
            folder = download_files(source.name, source.revision, [prefix + "config.json", *source.weights])
        except HubError as e:
            raise ConfigError(f"vae.pretrained={source.name!r}: downloading its weights, the Hub answered: {e}") from e
    vae = AutoencoderKL.from_pretrained(folder, subfolder=source.subfolder or None, use_safetensors=True)
    return vae.eval()


@torch.no_grad()
def to_grayscale(vae: AutoencoderKL) -> AutoencoderKL:
    """The same autoencoder for 1-channel images: gray -> 3 equal channels in, mean of the 3 channels out.

    Both are folded into the weights, so the result is a plain 1-channel AutoencoderKL that every pipeline and the
    latent cache use as any other: the first convolution applied to (g, g, g) is the convolution with the sum of its
    three input-channel kernels applied to g, and the mean of the output channels is the convolution with the mean
    of the three output kernels (and biases).
    """
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    gray = AutoencoderKL.from_config({**config, "in_channels": 1, "out_channels": 1})
    state = vae.state_dict()
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"].sum(1, keepdim=True)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"].mean(0, keepdim=True)
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"].mean(0, keepdim=True)
    gray.load_state_dict(state)
    return (gray if vae.dtype == torch.float32 else gray.to(vae.dtype)).eval()


def prepare(source: PretrainedSource, num_channels: int, resolution: int) -> AutoencoderKL:
    """The loaded autoencoder for this data: grayscale-converted if needed, and `sample_size` set to the data's
    resolution (the images this model is used at; pipelines and evaluation read it from there)."""
    vae = load(source)
    if num_channels == 1 and vae.config.in_channels == 3:
        vae = to_grayscale(vae)
    vae.register_to_config(sample_size=resolution)
    return vae


def publisher_statistics(source: PretrainedSource) -> dict[str, float | None]:
    """The publisher's scaling_factor and shift_factor (None: no shift), as its config.json gives them."""
    return {"scaling_factor": source.config.get("scaling_factor", 0.18215),
            "shift_factor": source.config.get("shift_factor")}


def chosen_statistics(mode: str, publisher: dict, mean: float | None, std: float | None) -> dict[str, float | None]:
    """scaling_factor and shift_factor to store: the publisher's (vae.latent_stats=config), or measured on the data
    (measure): 1/std, and the mean when it is at least SHIFT_MIN_STDS away from zero or the publisher shifts too."""
    if mode == "config":
        return dict(publisher)
    shift = mean if publisher["shift_factor"] is not None or abs(mean) >= SHIFT_MIN_STDS * std else None
    return {"scaling_factor": 1.0 / std, "shift_factor": shift}
