"""Latent cache: stored posterior moments, reuse and rebuild by key, UNet training without the encoder, streaming."""

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL
from PIL import Image

from ldm import cli
from ldm.config import load_config
from ldm.data import build_dataloader, build_datasets
from ldm.models import build_vae
from ldm.pipelines import latents
from ldm.train import latent_cache
from ldm.train.unet import train_unet

REPO = Path(__file__).resolve().parents[1]
FAST = {"denoiser.train.max_steps": 2, "denoiser.train.sample_every": 0, "denoiser.train.checkpointing_steps": 0,
        "denoiser.train.report_to": "none", "denoiser.sample_steps": 2, "data.max_samples": 40}


@pytest.fixture(autouse=True)
def _fresh_state(tmp_path_factory, monkeypatch):
    # Each run builds its own Accelerator / PartialState; the process-wide state must not leak between tests.
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets_cache")
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """An untrained tiny VAE (16 px grayscale -> 4x8x8) with a non-trivial scaling factor, saved like stage 1 does."""
    cfg = load_config(REPO / "configs/tiny.yaml")
    torch.manual_seed(0)
    vae = build_vae(cfg.vae.model, in_channels=1, resolution=16)
    vae.register_to_config(scaling_factor=0.7)
    path = tmp_path_factory.mktemp("vae") / "model"
    vae.save_pretrained(path)
    return path


def config(out: Path, vae_dir: Path, **overrides):
    return load_config(REPO / "configs/tiny.yaml",
                       {"output_dir": str(out), "denoiser.vae_path": str(vae_dir), **FAST, **overrides})


def build(cfg, vae: AutoencoderKL):
    _, _, info = build_datasets(cfg.data)
    return latent_cache.build_or_load(vae, cfg.data, info, latent_cache.cache_root(cfg),
                                      batch_size=16)


def forbid_encoder(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the VAE encoder ran")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)


def test_cache_holds_the_posterior_of_each_image_and_its_mirror(tmp_path, vae_dir, capsys):
    cfg = config(tmp_path, vae_dir, **{"data.random_flip": True})
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    cache = build(cfg, vae)
    assert "latent cache built" in capsys.readouterr().out

    # The same images, in the same order, unflipped.
    plain = cfg.data.__class__(**{**cfg.data.__dict__, "random_flip": False})
    train, _, _ = build_datasets(plain)
    batch = next(iter(build_dataloader(train, 40, shuffle=False, drop_last=False)))
    with torch.no_grad():
        mean, logvar = latents.posterior_moments(vae, batch["pixel_values"])
        mean_f, logvar_f = latents.posterior_moments(vae, batch["pixel_values"].flip(-1))
    rows = cache[:]
    assert len(cache) == 40 and rows["latent_mean"].shape == (40, 4, 8, 8)
    torch.testing.assert_close(rows["latent_mean"], mean)
    torch.testing.assert_close(rows["latent_logvar"], logvar)
    torch.testing.assert_close(rows["latent_mean_flipped"], mean_f)
    torch.testing.assert_close(rows["latent_logvar_flipped"], logvar_f)
    assert torch.equal(rows["label"], batch["label"])

    # On disk: several memory-mapped shards, no temporary leftovers.
    (path,) = latent_cache.cache_root(cfg).iterdir()
    assert len(list(path.glob("data-*.arrow"))) == latent_cache.MIN_SHARDS
    assert (path / "cache.json").is_file()
    assert cache.cache_files and cache.cache_files[0]["filename"].startswith(str(path))  # memory-mapped from there

    # Sampling from the moments: scaled, and one orientation per row.
    torch.manual_seed(0)
    z = latent_cache.sample_latents(vae, {k: v[:8] for k, v in rows.items()})
    assert z.shape == (8, 4, 8, 8)
    no_flip = latents.scale(vae, rows["latent_mean"][:8])
    flipped = latents.scale(vae, rows["latent_mean_flipped"][:8])
    # eps is small next to the gap between the two orientations for most rows of an untrained VAE
    nearest = ((z - no_flip).flatten(1).norm(dim=1) < (z - flipped).flatten(1).norm(dim=1))
    assert 0 < nearest.sum() < 8


def test_cache_is_reused_and_rebuilt_when_vae_or_data_change(tmp_path, vae_dir, capsys, monkeypatch):
    cfg = config(tmp_path, vae_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    first = build(cfg, vae)
    assert "latent cache built" in capsys.readouterr().out

    with monkeypatch.context() as m:
        forbid_encoder(m)
        again = build(cfg, vae)
    assert "latent cache reused" in capsys.readouterr().out
    assert torch.equal(first[:]["latent_mean"], again[:]["latent_mean"])

    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.01)
    build(cfg, vae)
    assert "latent cache built" in capsys.readouterr().out

    build(config(tmp_path, vae_dir, **{"data.max_samples": 24}), vae)
    assert "latent cache built" in capsys.readouterr().out
    assert len(list(latent_cache.cache_root(cfg).iterdir())) == 3  # one directory per key, nothing half-written


def test_unet_trains_from_the_cache_without_the_encoder(tmp_path, vae_dir, capsys, monkeypatch):
    cache_dir = tmp_path / "shared_cache"
    # Built ahead of time by the CLI...
    argv = ["cache-latents", "--config", str(REPO / "configs/tiny.yaml"), "--output_dir", str(tmp_path / "a"),
            f"--denoiser.vae_path={vae_dir}", f"--denoiser.latent_cache_dir={cache_dir}", "--data.max_samples=40"]
    assert cli.main(argv) == 0
    assert "latent cache built" in capsys.readouterr().out
    # ...then two UNet runs on the same data and VAE train from it; the encoder never runs.
    forbid_encoder(monkeypatch)
    for name in ("a", "b"):
        AcceleratorState._reset_state(reset_partial_state=True)
        train_unet(config(tmp_path / name, vae_dir, **{"denoiser.latent_cache_dir": str(cache_dir)}))
        assert "latent cache reused" in capsys.readouterr().out
        assert (tmp_path / name / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert len(list(cache_dir.iterdir())) == 1


def test_random_crops_train_without_a_cache(tmp_path, vae_dir, capsys):
    train_unet(config(tmp_path, vae_dir, **{"data.crop": "random", "denoiser.train.max_steps": 1}))
    assert "latent cache off: data.crop=random" in capsys.readouterr().out
    assert not (tmp_path / "latent_cache").exists()


@pytest.fixture
def parquet_dir(tmp_path) -> Path:
    """A local "hub" data set of 30 gray images in 3 parquet shards."""
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b"])})
    (tmp_path / "data").mkdir()
    for shard in range(3):
        images = [Image.fromarray(rng.integers(0, 255, (16, 16), np.uint8)) for _ in range(10)]
        ds = datasets.Dataset.from_dict({"img": images, "y": [i % 2 for i in range(10)]}, features=features)
        ds.to_parquet(str(tmp_path / "data" / f"train-{shard:05d}-of-00003.parquet"))
    return tmp_path


@pytest.mark.parametrize("cache", [True, False])
def test_streaming_hub_data_trains_end_to_end(tmp_path, vae_dir, parquet_dir, capsys, monkeypatch, cache):
    # datasets sleeps 5 s whenever a shuffled multi-shard parquet stream ends an epoch (apache/arrow#45214)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    stream = {"data.source": "hub", "data.path": str(parquet_dir), "data.image_column": "img",
              "data.label_column": "y", "data.streaming": True, "data.max_samples": None,
              "denoiser.latent_cache": cache, "denoiser.train.max_steps": 5}  # 30 images / batch 8: crosses an epoch
    cfg = config(tmp_path / "run", vae_dir, **stream)
    train_unet(cfg)
    out = capsys.readouterr().out
    assert ("latent cache built" in out) == cache
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
    if cache:  # one streaming pass wrote every image
        (path,) = latent_cache.cache_root(cfg).iterdir()
        assert len(latent_cache.load(path)) == 30


def test_streaming_vae_stage_trains(tmp_path, parquet_dir, monkeypatch):
    from ldm.train.vae import train_vae

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    cfg = load_config(REPO / "configs/tiny.yaml", {
        "output_dir": str(tmp_path), "data.source": "hub", "data.path": str(parquet_dir), "data.image_column": "img",
        "data.streaming": True, "vae.train.max_steps": 4, "vae.train.checkpointing_steps": 0,
        "vae.train.sample_every": 2, "vae.train.report_to": "none", "vae.scaling_samples": 16})
    metrics = train_vae(cfg)
    assert metrics["scaling_factor"] > 0 and "holdout_psnr" not in metrics  # a stream has no held-out split
    assert (tmp_path / "vae" / "model" / "config.json").is_file() and list((tmp_path / "vae" / "samples").glob("*.png"))


WORKER = '''
import logging, sys
import datasets, torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
from ldm.config import load_config
from ldm.train.unet import train_unet
out, vae, data = sys.argv[1:4]
train_unet(load_config(sys.argv[4], {
    "output_dir": out, "denoiser.vae_path": vae, "data.source": "hub", "data.path": data, "data.image_column": "img",
    "data.streaming": True, "denoiser.train.max_steps": 2, "denoiser.train.batch_size": 4,
    "denoiser.train.sample_every": 0, "denoiser.train.checkpointing_steps": 0, "denoiser.train.report_to": "none", "denoiser.sample_steps": 2}))
'''


def test_two_processes_build_the_cache_once(tmp_path, vae_dir, parquet_dir):
    """torchrun with 2 CPU processes (DDP over gloo): rank 0 streams the data into the cache, rank 1 waits and reads."""
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tmp_path / "run"), str(vae_dir), str(parquet_dir), str(REPO / "configs/tiny.yaml")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert log.count("ldm.train.latent_cache: latent cache built") == 1, log[-4000:]
    assert log.count("ldm.train.latent_cache: latent cache reused") == 1, log[-4000:]
    assert len(list((tmp_path / "run" / "latent_cache").iterdir())) == 1
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
