"""Stage 2: train a UNet to denoise the frozen VAE's latents, then save the whole diffusers pipeline.

What the UNet is conditioned on (nothing, class labels, captions) is `ldm.train.conditioning`'s business: it builds
the network, feeds it the condition and makes the pipeline that is sampled and saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

from ldm.config import ConfigError, RunConfig
from ldm.data import build_datasets, collate
from ldm.model_card import write_model_card
from ldm.models import checked_latent_shape
from ldm.objectives import make_objective
from ldm.pipelines import latents
from ldm.pipelines.loading import check_weights_files, save_pipeline
from ldm.schedulers import make_scheduler
from ldm.train import best, budget, latent_cache
from ldm.train.conditioning import NoConditioning, make_conditioning, stock_dit
from ldm.train.devices import use_cpu
from ldm.train.spine import check_trackers, ema_weights, fit


def resolve_vae_path(cfg: RunConfig) -> Path:
    return Path(cfg.denoiser.vae_path) if cfg.denoiser.vae_path else Path(cfg.output_dir) / "vae" / "model"


def load_frozen_vae(path: Path) -> AutoencoderKL:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained VAE at {path}: run train_vae.py with the same --config/--output_dir first, "
            "or set denoiser.vae_path to a diffusers AutoencoderKL folder"
        )
    check_weights_files(path)
    vae = AutoencoderKL.from_pretrained(path, use_safetensors=True)
    vae.requires_grad_(False).eval()
    return vae


def fit_vae_to_data(vae: AutoencoderKL, num_channels: int, resolution: int) -> None:
    """Check the VAE takes the data's channels and its downsampling factor divides the resolution; then record the
    resolution as its `sample_size`. The network is fully convolutional: `sample_size` only says which images a
    saved model makes (pipelines and evaluation read it), so a published VAE's 256 or 512 is no reason to refuse."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if vae.config.in_channels != num_channels:
        raise ConfigError(
            f"the VAE takes {vae.config.in_channels}-channel images but data gives {num_channels}-channel images; "
            "match data.color_mode to the VAE, or make it with train_vae.py (vae.pretrained converts an RGB "
            "autoencoder for grayscale data)"
        )
    if resolution % factor:
        raise ConfigError(f"data.resolution={resolution} is not divisible by the VAE's downsampling factor {factor}")
    if vae.config.sample_size != resolution:
        vae.register_to_config(sample_size=resolution)


def set_dtype(vae: AutoencoderKL, dtype: torch.dtype) -> None:
    # Only when it changes: diffusers warns on every dtype cast of a loaded model.
    if vae.dtype != dtype:
        vae.to(dtype)


class UNetTask:
    name = "unet"

    def __init__(self, cfg: RunConfig, vae: AutoencoderKL, conditioning=None):
        self.cfg = cfg
        self.vae = vae
        self.conditioning = conditioning or NoConditioning()
        # How noise and data are mixed and what the network predicts (DDPM or flow); its scheduler is saved.
        self.objective = make_objective(cfg.denoiser.diffusion)
        self.noise_scheduler = self.objective.scheduler
        self.eval_network, self.eval_real, self.best = None, None, None
        self.best_dir = Path(cfg.output_dir) / "unet" / "best"
        if cfg.denoiser.train.eval_every:
            # Loaded before training, so a missing classifier or Inception weights fail in seconds.
            from ldm.eval.features import FeatureNetworkUnavailable, load_feature_network

            try:
                self.eval_network = load_feature_network(cfg.denoiser.eval_features)
            except (FeatureNetworkUnavailable, FileNotFoundError) as e:
                raise ConfigError("denoiser.train.eval_every > 0 needs a feature network (denoiser.eval_features): "
                                  f"{e}") from e
            from ldm.eval.evaluation import headline_key

            # The score of unet/best/ to beat: the resumed run's, if it was measured by the same metric.
            self.best = best.resumed_best(self.best_dir.parent, cfg.denoiser.train,
                                          headline_key(self.eval_network, cfg.denoiser.eval_metric))

    def build_modules(self) -> dict[str, nn.Module]:
        return {"model": self.conditioning.build_model(self.cfg, self.vae)}

    def learning_rate(self, module_name: str, default: float) -> float:
        return default

    def attach(self, accelerator, modules: dict[str, nn.Module]) -> None:
        self.accelerator = accelerator
        self.unet = modules["model"]
        # The frozen VAE only encodes (and decodes sample grids): in vae_dtype, NHWC on CUDA like the UNet.
        self.vae.to(accelerator.device)
        set_dtype(self.vae, getattr(torch, self.cfg.denoiser.vae_dtype))
        if accelerator.device.type == "cuda" and self.cfg.denoiser.train.channels_last:
            self.vae.to(memory_format=torch.channels_last)
        self.conditioning.attach(accelerator.device)

    def compute_loss(self, batch: dict, step: int):
        # 1. Fresh latents z ~ q(z|x) every step (the posterior is sampled, as LDM does), scaled to unit std:
        #    from the cached posterior moments, or by encoding the images.
        with torch.no_grad():
            if latent_cache.MEAN in batch:
                batch = latent_cache.choose_orientation(batch)  # one choice for the latents and any low-res image
                z0 = latent_cache.sample_latents(self.vae, batch)
            else:
                z0 = latents.encode(self.vae, batch["pixel_values"])
        # The UNet's weights stay float32 whatever vae_dtype and mixed_precision are (autocast lowers its compute).
        z0 = z0.float()
        # 2. Forward process of the objective (ldm.objectives), timesteps from the global RNG that checkpoints keep:
        #    ddpm z_t = sqrt(ᾱ_t)·z_0 + sqrt(1 − ᾱ_t)·ε, t ~ U{0..T−1}; flow z_σ = (1 − σ)·z_0 + σ·ε, t = σ·T.
        noise = torch.randn_like(z0)
        timesteps = self.objective.sample_t(z0.shape[0], z0.device)
        noisy = self.objective.noisy(z0, noise, timesteps)
        # 3. The network predicts the objective's target (ε or v; the velocity ε − z_0) given the condition (dropped
        #    for a share of the batch); the loss is the MSE to that target.
        pred = self.conditioning.model_output(self.unet, noisy, timesteps, batch, train=True)
        return self.objective.loss(pred, self.objective.target(z0, noise, timesteps), timesteps)

    def make_pipeline(self, model):
        scheduler = make_scheduler(self.cfg.denoiser.sample_scheduler, self.noise_scheduler.config,
                                   self.cfg.denoiser.sample_timestep_spacing, key="denoiser.sample_scheduler",
                                   spacing_key="denoiser.sample_timestep_spacing")
        return self.conditioning.make_pipeline(model, self.vae, scheduler)

    @torch.no_grad()
    def sample_grid(self, model, step: int) -> Image.Image:
        pipe = self.make_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        stage = self.cfg.denoiser
        return self.conditioning.sample_grid(pipe, stage.train.num_sample_images, stage.train.seed, stage.sample_steps)

    @torch.no_grad()
    def evaluate(self, accelerator, model, ema, step: int) -> dict[str, Any]:
        """Score denoiser.eval_num_samples samples of the EMA weights (all processes share the sampling), log them as
        eval/*, and save the pipeline as unet/best/ when denoiser.eval_metric improves."""
        from ldm.eval.evaluation import HIGHER_IS_BETTER, evaluate_pipeline, headline_key, reference_features

        cfg, metric = self.cfg.denoiser, self.cfg.denoiser.eval_metric
        if self.eval_real is None:
            self.eval_real = reference_features(self.eval_network, self.cfg.data, cfg.train.batch_size,
                                                accelerator.device)
        with ema_weights(accelerator, model, ema) as sampling_model:
            result = evaluate_pipeline(self.make_pipeline(sampling_model), self.eval_network, self.eval_real,
                                       cfg.eval_num_samples, cfg.sample_steps, cfg.train.batch_size,
                                       seed=cfg.train.seed, names=(metric,), plan=self.conditioning.sample_plan())
            key = headline_key(self.eval_network, metric)
            value = result["metrics"][key]
            accelerator.log({f"eval/{k}": v for k, v in result["metrics"].items() if isinstance(v, float)}, step=step)
            self.best = best.keep(accelerator, self.best_dir, self.best, value, HIGHER_IS_BETTER[metric],
                                  sampling_model, lambda folder: self._write_best(sampling_model, folder),
                                  {"step": step, "metric": key, "value": value, **result})
        accelerator.wait_for_everyone()
        return result

    def _write_best(self, model, folder: Path) -> None:
        dtype = self.vae.dtype
        set_dtype(self.vae, torch.float32)  # saved models hold float32 weights whatever vae_dtype is
        try:
            save_pipeline(self.make_pipeline(model), folder)
        finally:
            set_dtype(self.vae, dtype)

    def finish(self, model) -> dict[str, Any]:
        out = Path(self.cfg.output_dir) / "pipeline"
        set_dtype(self.vae, torch.float32)  # saved models hold float32 weights whatever vae_dtype was
        save_pipeline(self.make_pipeline(model), out)
        grid_path = Path(self.cfg.output_dir) / "unet" / "samples" / "final.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        self.sample_grid(model, self.cfg.denoiser.train.max_steps).save(grid_path)
        write_model_card(out, self.cfg, samples=grid_path, conditioning=self.conditioning)
        return {"pipeline": str(out), "grid": str(grid_path)}


def wants_captions(cfg: RunConfig) -> bool:
    return cfg.denoiser.conditioning == "text"


def wants_low_res(cfg: RunConfig) -> bool:
    return cfg.denoiser.task == "superres"


def cached_or_images(cfg: RunConfig, vae: AutoencoderKL, train_dataset, info):
    """(data set, collate_fn) to train on: the latent cache (built or reused) if enabled and possible, else images."""
    if not cfg.denoiser.latent_cache:
        return train_dataset, collate
    reason = latent_cache.skip_reason(cfg.data)
    if reason is not None:
        print(f"latent cache off: {reason}; encoding on the fly")
        return train_dataset, collate
    return build_latent_cache(cfg, vae, info), latent_cache.collate


def build_latent_cache(cfg: RunConfig, vae: AutoencoderKL, info):
    """The latent cache of cfg's data under this VAE: reused if it exists, else built (once across processes)."""
    return latent_cache.build_or_load(vae, cfg.data, info, latent_cache.cache_root(cfg),
                                      batch_size=cfg.denoiser.train.batch_size, cpu=use_cpu(cfg.denoiser.train),
                                      captions=wants_captions(cfg), low_res=wants_low_res(cfg))


def load_vae_and_data(cfg: RunConfig):
    """The frozen VAE, the training images and their DataInfo, checked to fit each other and the UNet config."""
    vae = load_frozen_vae(resolve_vae_path(cfg))
    train_dataset, _, info = build_datasets(cfg.data, captions=wants_captions(cfg), low_res=wants_low_res(cfg))
    fit_vae_to_data(vae, info.num_channels, info.resolution)
    checked_latent_shape(cfg.denoiser.model, vae)  # sizes (a UNet's levels, a DiT's patches) before any work
    if cfg.denoiser.conditioning == "class":
        from ldm.train.conditioning import check_labels

        check_labels(info, cfg.data.path or cfg.data.source)
        stock_dit(cfg, vae, info.num_classes)  # a class DiT asked for DiTPipeline that cannot fit it: ConfigError
    return vae, train_dataset, info


def train_unet(cfg: RunConfig) -> dict[str, Any]:
    """Train the latent UNet of `cfg` on the VAE of stage 1; writes the pipeline to <output_dir>/pipeline."""
    check_trackers(cfg.denoiser.train, "denoiser")
    started_at = budget.clock()  # a time budget (train.max_minutes) includes loading the data and its latent cache
    vae, train_dataset, info = load_vae_and_data(cfg)
    train_dataset, collate_fn = cached_or_images(cfg, vae, train_dataset, info)
    if wants_low_res(cfg):
        from ldm.train.superres import SuperResConditioning

        conditioning = SuperResConditioning(cfg, train_dataset)
    else:
        conditioning = make_conditioning(cfg, info, train_dataset, Path(cfg.output_dir) / "unet")
    metrics = fit(UNetTask(cfg, vae, conditioning), cfg, cfg.denoiser.train, train_dataset, collate_fn,
                  started_at=started_at)
    if metrics:
        print(f"pipeline saved to {metrics['pipeline']}; samples: {metrics['grid']}")
    return metrics
