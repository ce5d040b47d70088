"""The two training stages in-process on tiny models: outputs, scaling factor, checkpoints, exact resume."""

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import run, tiny_config
from safetensors.torch import load_file

from ldm.config import ConfigError, load_config
from ldm.data import build_dataloader, build_datasets
from ldm.pipelines import latents
from ldm.train.unet import train_unet
from ldm.train.vae import train_vae


@pytest.fixture(scope="module")
def trained_vae_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run(train_vae, tiny_config(out, **{"vae.train.max_steps": 20}))
    return out


def test_vae_stage_outputs(trained_vae_dir):
    vae_dir = trained_vae_dir / "vae"
    assert (vae_dir / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert (vae_dir / "config.yaml").is_file()
    saved = load_config(vae_dir / "config.yaml")
    assert saved.vae.train.max_steps == 20
    # checkpoints every 3 steps, only the newest 3 kept, no temporary leftovers
    names = sorted(p.name for p in (vae_dir / "checkpoints").iterdir())
    assert names == ["checkpoint-12", "checkpoint-15", "checkpoint-18"]
    assert list((vae_dir / "samples").glob("step-*.png"))
    assert list((vae_dir / "logs").rglob("events.out.tfevents.*"))


def test_stored_scaling_factor_gives_unit_std_latents(trained_vae_dir):
    vae = AutoencoderKL.from_pretrained(trained_vae_dir / "vae" / "model")
    assert vae.config.scaling_factor != 1.0
    cfg = load_config(trained_vae_dir / "vae" / "config.yaml")
    train, _, _ = build_datasets(cfg.data, seed=1)
    loader = build_dataloader(train, 64, shuffle=False, num_workers=0, seed=0, drop_last=False)
    with torch.no_grad():
        z = torch.cat([latents.encode(vae, batch["pixel_values"]) for batch in loader])
    assert z.std().item() == pytest.approx(1.0, abs=0.05)


def test_unet_requires_a_trained_vae(tmp_path):
    with pytest.raises(FileNotFoundError, match="run train_vae.py"):
        run(train_unet, tiny_config(tmp_path))


def test_unet_size_mismatch_is_a_clear_error(trained_vae_dir):
    cfg = tiny_config(trained_vae_dir, **{"unet.model.sample_size": 4})
    with pytest.raises(ConfigError, match=r"sample_size=4 does not match the VAE's latent size 8 \(16 px"):
        run(train_unet, cfg)


def unet_run(base: Path, vae_run: Path, name: str, **overrides) -> Path:
    out = base / name
    return out, tiny_config(out, **{"unet.vae_path": str(vae_run / "vae" / "model"), **overrides})


def test_resumed_run_ends_with_identical_weights(trained_vae_dir, tmp_path):
    """6 steps straight == 3 steps, crash, resume for 3 more: weights, EMA and optimizer state bitwise equal."""
    straight, cfg = unet_run(tmp_path, trained_vae_dir, "straight")
    run(train_unet, cfg)

    resumed, cfg = unet_run(tmp_path, trained_vae_dir, "resumed")
    run(train_unet, cfg)
    # Simulate a crash right after step 3: only checkpoint-3 survives.
    shutil.rmtree(resumed / "unet" / "checkpoints" / "checkpoint-6")
    shutil.rmtree(resumed / "pipeline")
    _, cfg = unet_run(tmp_path, trained_vae_dir, "resumed", **{"unet.train.resume_from_checkpoint": "latest"})
    run(train_unet, cfg)

    assert_same_checkpoint(straight / "unet" / "checkpoints" / "checkpoint-6",
                           resumed / "unet" / "checkpoints" / "checkpoint-6")
    a = load_file(straight / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ...and the run did change the weights (the comparison is not between two untouched inits).
    c3 = load_file(resumed / "unet" / "checkpoints" / "checkpoint-3" / "model.safetensors")
    assert any(not torch.equal(a_, c3[k]) for k, a_ in load_file(
        straight / "unet" / "checkpoints" / "checkpoint-6" / "model.safetensors").items())


def test_resume_from_missing_path_is_a_clear_error(trained_vae_dir, tmp_path):
    _, cfg = unet_run(tmp_path, trained_vae_dir, "x", **{"unet.train.resume_from_checkpoint": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        run(train_unet, cfg)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every weight file (models, discriminator, EMA) and the optimizer state are bitwise equal."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors")) and names
    for name in names:
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}:{key} differs after resume"
    opt_a = torch.load(a / "optimizer.bin", weights_only=True)["state"]
    opt_b = torch.load(b / "optimizer.bin", weights_only=True)["state"]
    assert opt_a.keys() == opt_b.keys()
    for index in opt_a:
        for key, value in opt_a[index].items():
            assert torch.equal(value, opt_b[index][key]), f"optimizer state {index}.{key} differs after resume"


def test_resumed_vae_with_discriminator_continues_exactly(tmp_path):
    """The autoencoder stage with its discriminator (started at step 2) resumes bitwise too."""
    gan = {"vae.loss.disc_weight": 0.5, "vae.loss.disc_start": 2, "vae.loss.disc_layers": 1, "vae.train.use_ema": True}
    run(train_vae, tiny_config(tmp_path / "straight", **gan))
    run(train_vae, tiny_config(tmp_path / "resumed", **gan))
    shutil.rmtree(tmp_path / "resumed" / "vae" / "checkpoints" / "checkpoint-6")
    run(train_vae, tiny_config(tmp_path / "resumed", **gan, **{"vae.train.resume_from_checkpoint": "latest"}))
    straight = tmp_path / "straight" / "vae" / "checkpoints" / "checkpoint-6"
    assert (straight / "model_1.safetensors").is_file()  # the discriminator is part of the state
    assert_same_checkpoint(straight, tmp_path / "resumed" / "vae" / "checkpoints" / "checkpoint-6")
