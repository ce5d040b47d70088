"""Stage 2: train a UNet2DModel to denoise the frozen VAE's latents, then save the whole diffusers pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

from ldm import latents
from ldm.config import ConfigError, RunConfig
from ldm.data import build_datasets, collate
from ldm.images import image_grid
from ldm.losses import diffusion_loss, diffusion_target
from ldm.models import build_noise_scheduler, build_unet
from ldm.pipeline import LatentDiffusionPipeline
from ldm.schedulers import make_scheduler
from ldm.training import fit


def resolve_vae_path(cfg: RunConfig) -> Path:
    return Path(cfg.unet.vae_path) if cfg.unet.vae_path else Path(cfg.output_dir) / "vae" / "model"


def load_frozen_vae(path: Path) -> AutoencoderKL:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained VAE at {path}: run train_vae.py with the same --config/--output_dir first, "
            "or set unet.vae_path to a diffusers AutoencoderKL folder"
        )
    vae = AutoencoderKL.from_pretrained(path, use_safetensors=True)
    vae.requires_grad_(False).eval()
    return vae


def check_vae_matches_data(vae: AutoencoderKL, num_channels: int, resolution: int) -> None:
    if vae.config.in_channels != num_channels or vae.config.sample_size != resolution:
        raise ConfigError(
            f"the VAE was trained on {vae.config.in_channels}-channel {vae.config.sample_size}px images but "
            f"data gives {num_channels}-channel {resolution}px images; match data.color_mode/data.resolution "
            "to the VAE or train a new one"
        )


class UNetTask:
    name = "unet"

    def __init__(self, cfg: RunConfig, vae: AutoencoderKL):
        self.cfg = cfg
        self.vae = vae
        self.noise_scheduler = build_noise_scheduler(cfg.unet.diffusion)

    def build_modules(self) -> dict[str, nn.Module]:
        return {"model": build_unet(self.cfg.unet.model, self.vae)}

    def learning_rate(self, module_name: str, default: float) -> float:
        return default

    def attach(self, accelerator, modules: dict[str, nn.Module]) -> None:
        self.accelerator = accelerator
        self.unet = modules["model"]
        self.vae.to(accelerator.device)

    def compute_loss(self, batch: dict, step: int):
        # 1. Fresh latents z ~ q(z|x) every step (the posterior is sampled, as LDM does), scaled to unit std.
        with torch.no_grad():
            z0 = latents.encode(self.vae, batch["pixel_values"])
        # 2. Forward process: z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps, t ~ U{0..T-1}.
        noise = torch.randn_like(z0)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device
        )
        noisy = self.noise_scheduler.add_noise(z0, noise, timesteps)
        # 3. The UNet predicts eps (or v); the loss is the MSE to that target.
        pred = self.unet(noisy, timesteps).sample
        target = diffusion_target(self.noise_scheduler, z0, noise, timesteps)
        return diffusion_loss(pred, target, timesteps, self.noise_scheduler, self.cfg.unet.diffusion.snr_gamma)

    def make_pipeline(self, unet) -> LatentDiffusionPipeline:
        scheduler = make_scheduler(self.cfg.unet.sample_scheduler, self.noise_scheduler.config)
        return LatentDiffusionPipeline(vae=self.vae, unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def sample_grid(self, model, step: int) -> Image.Image:
        n = self.cfg.unet.train.num_sample_images
        pipe = self.make_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(self.cfg.unet.train.seed)
        return image_grid(pipe(batch_size=n, generator=generator, num_inference_steps=self.cfg.unet.sample_steps).images)

    def finish(self, model) -> dict[str, Any]:
        out = Path(self.cfg.output_dir) / "pipeline"
        self.make_pipeline(model).save_pretrained(out)
        grid_path = Path(self.cfg.output_dir) / "unet" / "samples" / "final.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        self.sample_grid(model, self.cfg.unet.train.max_steps).save(grid_path)
        return {"pipeline": str(out), "grid": str(grid_path)}


def train_unet(cfg: RunConfig) -> dict[str, Any]:
    """Train the latent UNet of `cfg` on the VAE of stage 1; writes the pipeline to <output_dir>/pipeline."""
    vae = load_frozen_vae(resolve_vae_path(cfg))
    train_dataset, _, info = build_datasets(cfg.data, seed=cfg.unet.train.seed)
    check_vae_matches_data(vae, info.num_channels, info.resolution)
    build_unet(cfg.unet.model, vae)  # size checks before any work
    metrics = fit(UNetTask(cfg, vae), cfg, cfg.unet.train, train_dataset, collate)
    if metrics:
        print(f"pipeline saved to {metrics['pipeline']}; samples: {metrics['grid']}")
    return metrics
