"""Latent cache: encode the training images once with the frozen VAE, train the UNet from disk.

Encoding every image at every step repeats the same VAE forward pass each epoch. The cache stores, per image, the
posterior's mean and log-variance (unscaled), its label and (for text conditioning) its caption, so each epoch still draws a fresh
``z = mean + exp(logvar / 2) * eps`` and scales it (`ldm.pipelines.latents.sample_from_moments`), exactly as LDM trains on
``z ~ q(z|x)``. The UNet stage then never runs the encoder.

Layout: ``<root>/<key>/`` is a `datasets` data set written with ``save_to_disk`` in several shards and read back
memory-mapped with ``load_from_disk``, so it can be larger than RAM. The key hashes the VAE weights, the data
fingerprint (`DataInfo.fingerprint`: source, files, selection and transforms) and this module's format version; any
change gives a new key, hence a rebuild. A build writes to a temporary directory and renames it when complete.

Horizontal flips (`data.random_flip`): both orientations are encoded and stored, and training picks one per image
and step with p = 0.5, which is the distribution that flipping the pixels gives. Flipping the cached latents instead
would be wrong: the encoder is not mirror-equivariant. For the tiny VAE of configs/tiny.yaml trained 400 steps,
||flip(mu(x)) - mu(flip(x))|| / ||mu(x)|| = 1.41 (7x the posterior std), and decoding flip(mu(x)) gives 6 dB PSNR
against flip(x) where mu(flip(x)) gives 27 dB (benchmarks/latent_flip.py). Storing both costs 2x encode and disk.

Random crops (`data.crop: random`) draw a new crop every epoch, which one stored crop per image cannot reproduce:
the cache is then skipped and the UNet encodes on the fly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from datasets.arrow_writer import ArrowWriter
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ldm.config import DataConfig, RunConfig
from ldm.data import DataError, DataInfo, build_dataloader, build_datasets
from ldm.pipelines import latents
from ldm.train import shared_files

logger = logging.getLogger(__name__)

# Bump when the stored columns or their meaning change: old caches then get a new key and are rebuilt.
CACHE_VERSION = 1
MIN_SHARDS = 4  # shards of even a small cache, so loaders and readers can split it
MAX_SHARD_BYTES = 256 * 2**20  # bigger caches get more shards of at most this size

MEAN, LOGVAR = "latent_mean", "latent_logvar"
MEAN_FLIPPED, LOGVAR_FLIPPED = "latent_mean_flipped", "latent_logvar_flipped"
LOW_RES = "low_res"  # super-resolution: the low-res image made from the same image as the latents (unflipped)


def cache_root(cfg: RunConfig) -> Path:
    chosen = cfg.denoiser.latent_cache_dir
    return Path(chosen) if chosen else Path(cfg.output_dir) / "latent_cache"


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """sha256 of every weight's name, dtype, shape and bytes: any change of the VAE changes it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(vae: AutoencoderKL, info: DataInfo, data_cfg: DataConfig | None = None) -> str:
    key = {"version": CACHE_VERSION, "vae": vae_fingerprint(vae), "data": info.fingerprint}
    if data_cfg is not None and data_cfg.streaming and data_cfg.path and Path(data_cfg.path).is_dir():
        # A stream has no datasets fingerprint of its files (DataInfo's data_id is None): list them here.
        root = Path(data_cfg.path)
        key["files"] = sorted((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
                              for f in root.rglob("*") if f.is_file())
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def skip_reason(data_cfg: DataConfig) -> str | None:
    """Why this data cannot be cached (None: it can)."""
    if data_cfg.crop == "random":
        return "data.crop=random draws a new crop every epoch, which one stored crop per image cannot reproduce"
    return None


def load(path: Path) -> datasets.Dataset:
    """The cache at `path`, memory-mapped, yielding torch tensors."""
    ds = datasets.load_from_disk(str(path))
    ds.set_format("torch")
    return ds


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate(examples)


def build_or_load(vae: AutoencoderKL, data_cfg: DataConfig, info: DataInfo, root: Path,
                  batch_size: int = 64, cpu: bool = False, captions: bool = False,
                  low_res: bool = False) -> datasets.Dataset:
    """Return the cache for (vae, data), building it first if no cache with its key exists under `root`.

    In a multi-process run one process builds it while the others wait, then all load what it wrote: the main
    process, and on a node that does not share its file system, that node's local main process
    (`ldm.train.shared_files.write_once`).
    """
    path = Path(root) / cache_key(vae, info, data_cfg)
    state = PartialState(cpu=cpu)

    def write() -> None:
        build(vae, data_cfg, path, batch_size, device=state.device, data_fingerprint=info.fingerprint,
              captions=captions, low_res=low_res)

    built = shared_files.write_once(state, lambda: (path / "cache.json").is_file(), write)
    if not (path / "cache.json").is_file():
        raise RuntimeError(f"the latent cache {path} was not written; is {root} writable on every node?")
    ds = load(path)
    message = f"latent cache {'built' if built else 'reused'}: {path} ({len(ds)} images)"
    logger.info(message)
    if state.is_local_main_process:  # one line per node: each may have built its own
        print(message)
    return ds


@torch.no_grad()
def build(vae: AutoencoderKL, data_cfg: DataConfig, path: Path, batch_size: int = 64,
          device: torch.device | str | None = None, data_fingerprint: str | None = None,
          captions: bool = False, low_res: bool = False) -> None:
    """Encode the training images of `data_cfg` (eval mode, batched) and write the cache atomically to `path`.

    1. the same images as training (same selection and crop), unflipped; streamed sets are read in one pass;
    2. posterior mean and logvar of each batch, and of its mirror image when data.random_flip is on;
    3. rows appended to one Arrow file (memory stays flat however many images there are);
    4. that file re-written by `save_to_disk` in shards into a temporary directory, renamed to `path` when done.
    """
    flips = data_cfg.random_flip
    train, _, info = build_datasets(dataclasses.replace(data_cfg, random_flip=False, verify_images=False),
                                    captions=captions, low_res=low_res)
    loader = build_dataloader(train, batch_size, shuffle=False, num_workers=data_cfg.num_workers, seed=data_cfg.seed,
                              drop_last=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = shared_files.temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "build").mkdir(parents=True)
    was_training = vae.training
    vae.eval()
    if device is not None:
        vae.to(device)
    writer = None
    try:
        total = math.ceil(info.num_train / batch_size) if info.num_train else None
        for batch in tqdm(loader, total=total, desc="caching latents", disable=total is not None and total < 20):
            x = batch["pixel_values"]
            n = x.shape[0]
            mean, logvar = latents.posterior_moments(vae, torch.cat([x, x.flip(-1)]) if flips else x)
            columns = {MEAN: mean[:n], LOGVAR: logvar[:n]}
            if flips:
                columns.update({MEAN_FLIPPED: mean[n:], LOGVAR_FLIPPED: logvar[n:]})
            if low_res:
                columns[LOW_RES] = batch["low_res"]
            if writer is None:
                writer = ArrowWriter(features=_features(columns, captions), path=str(tmp / "build" / "latents.arrow"))
            rows = {k: v.float().cpu().numpy() for k, v in columns.items()}
            rows["label"] = batch["label"].numpy()
            if captions:
                rows["caption"] = batch["caption"]
            writer.write_batch(rows)
        if writer is None:
            raise DataError(f"no training images to cache (data.path={data_cfg.path!r})")
        num_rows, num_bytes = writer.finalize()
        ds = datasets.Dataset.from_file(str(tmp / "build" / "latents.arrow"))
        num_shards = max(min(MIN_SHARDS, num_rows), math.ceil(num_bytes / MAX_SHARD_BYTES))
        ds.save_to_disk(str(tmp / "data"), num_shards=num_shards)
        del ds
        shutil.rmtree(tmp / "build")
        # For people reading the directory; the key in its name is what decides reuse.
        meta = {"version": CACHE_VERSION, "data_fingerprint": data_fingerprint, "flips": flips,
                "num_rows": num_rows, "num_shards": num_shards, "latent_shape": list(mean.shape[1:])}
        (tmp / "data" / "cache.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp / "data", path)  # atomic on one file system; an existing (complete) cache is not touched
    except OSError:
        if not (path / "cache.json").is_file():  # only a concurrent builder that won the rename is not an error
            raise
    finally:
        vae.train(was_training)
        shutil.rmtree(tmp, ignore_errors=True)


def _features(columns: dict[str, torch.Tensor], captions: bool = False) -> datasets.Features:
    features = {name: datasets.Array3D(tuple(value.shape[1:]), "float32") for name, value in columns.items()}
    features["label"] = datasets.Value("int64")
    if captions:
        features["caption"] = datasets.Value("string")
    return datasets.Features(features)


def choose_orientation(batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
    """With stored mirror images, each row picks one orientation with p = 0.5 (its low-res image, if any, flipped
    to match: the bicubic resize commutes with the mirror); without them the batch is returned as it is."""
    if MEAN_FLIPPED not in batch:
        return batch
    mean = batch[MEAN]
    flip = (torch.rand(mean.shape[0], device=mean.device, generator=generator) < 0.5).view(-1, 1, 1, 1)
    chosen = {MEAN: torch.where(flip, batch[MEAN_FLIPPED], mean),
              LOGVAR: torch.where(flip, batch[LOGVAR_FLIPPED], batch[LOGVAR])}
    if LOW_RES in batch:
        chosen[LOW_RES] = torch.where(flip, batch[LOW_RES].flip(-1), batch[LOW_RES])
    return {k: v for k, v in batch.items() if k not in (MEAN_FLIPPED, LOGVAR_FLIPPED)} | chosen


def sample_latents(vae: AutoencoderKL, batch: dict[str, torch.Tensor],
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh scaled latents for a batch of cache rows; with stored mirror images, each row picks one with p = 0.5
    (call `choose_orientation` first to keep the choice for other columns)."""
    batch = choose_orientation(batch, generator)
    return latents.sample_from_moments(vae, batch[MEAN], batch[LOGVAR], generator=generator)

