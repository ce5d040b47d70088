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
from ldm.train.unet import UNetTask, train_unet
from ldm.train.vae import VAETask, train_vae


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
    train, _, _ = build_datasets(cfg.data)
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


# 24 training images in batches of 8, 2 micro-batches per optimizer step: an epoch is 3 micro-batches and 2 steps
# (the second of only one micro-batch), so checkpoint-3 lies inside the second epoch and the 6 steps cross two epoch
# boundaries.
EPOCHS_AND_ACCUMULATION = {"data.max_samples": 24, "train.gradient_accumulation_steps": 2}


def stage_overrides(stage: str, **overrides) -> dict:
    return {(f"{stage}.{k}" if k.startswith("train.") else k): v for k, v in overrides.items()}


def crash_after_step_3(straight: Path, resumed: Path, stage: str) -> dict[str, tuple[bytes, int]]:
    """The run dir a crash right after step 3 leaves (checkpoint-3, no final model); returns checkpoint-3's files."""
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / stage / "checkpoints" / "checkpoint-6")
    shutil.rmtree(resumed / ("pipeline" if stage == "unet" else "vae/model"))
    return files_of(resumed / stage / "checkpoints" / "checkpoint-3")


def files_of(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def count_micro_batches(monkeypatch, task_cls) -> list[int]:
    """Record the optimizer step at which each micro-batch's loss is computed."""
    seen, compute_loss = [], task_cls.compute_loss

    def counting(self, batch, step):
        seen.append(step)
        return compute_loss(self, batch, step)

    monkeypatch.setattr(task_cls, "compute_loss", counting)
    return seen


def test_resumed_run_ends_with_identical_weights(trained_vae_dir, tmp_path, monkeypatch):
    """UNet from the latent cache with both flips stored: 6 steps straight == crash after step 3 + resume for 3 more,
    with gradient accumulation and two epoch boundaries. Weights, EMA and optimizer state bitwise equal."""
    options = {"data.random_flip": True, **stage_overrides("unet", **EPOCHS_AND_ACCUMULATION)}
    straight, cfg = unet_run(tmp_path, trained_vae_dir, "straight", **options)
    run(train_unet, cfg)
    checkpoint_3 = crash_after_step_3(straight, tmp_path / "resumed", "unet")

    _, cfg = unet_run(tmp_path, trained_vae_dir, "resumed", **options,
                      **{"unet.train.resume_from_checkpoint": "latest"})
    micro_batches = count_micro_batches(monkeypatch, UNetTask)
    metrics = run(train_unet, cfg)
    resumed = tmp_path / "resumed"

    # A resume, not a silent restart: it started at step 3 inside the second epoch (2 of its 3 micro-batches done),
    # computed only the micro-batches of steps 4 (1), 5 (2) and 6 (1), and left checkpoint-3 as it was.
    assert metrics["start_step"] == 3
    assert micro_batches == [3, 4, 4, 5]
    assert files_of(resumed / "unet" / "checkpoints" / "checkpoint-3") == checkpoint_3
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


def test_resumed_vae_with_augmentation_and_discriminator_continues_exactly(tmp_path, monkeypatch):
    """The autoencoder stage with random crops and flips, gradient accumulation, epoch boundaries and its
    discriminator (started at step 2) resumes bitwise too."""
    options = {"vae.loss.disc_weight": 0.5, "vae.loss.disc_start": 2, "vae.loss.disc_layers": 1,
               "vae.train.use_ema": True, "data.crop": "random", "data.random_flip": True,
               **stage_overrides("vae", **EPOCHS_AND_ACCUMULATION)}
    run(train_vae, tiny_config(tmp_path / "straight", **options))
    checkpoint_3 = crash_after_step_3(tmp_path / "straight", tmp_path / "resumed", "vae")
    micro_batches = count_micro_batches(monkeypatch, VAETask)
    metrics = run(train_vae, tiny_config(tmp_path / "resumed", **options,
                                         **{"vae.train.resume_from_checkpoint": "latest"}))
    assert metrics["start_step"] == 3 and micro_batches == [3, 4, 4, 5]
    assert files_of(tmp_path / "resumed" / "vae" / "checkpoints" / "checkpoint-3") == checkpoint_3
    straight = tmp_path / "straight" / "vae" / "checkpoints" / "checkpoint-6"
    assert (straight / "model_1.safetensors").is_file()  # the discriminator is part of the state
    assert_same_checkpoint(straight, tmp_path / "resumed" / "vae" / "checkpoints" / "checkpoint-6")
