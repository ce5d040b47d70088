"""The UNet stage in super-resolution mode (`denoiser.task: superres`, LDM-SR): the UNet learns p(z | low-res).

It plugs into the stage as a conditioning (see `ldm.train.conditioning`): the "condition" is the training image's
low-res version (`data.degrade`), which the data transform makes from the same image the latents come from, so
the latent cache stores it beside the posterior moments. Every step:
  1. blur and noise the low-res images afresh (`ldm.degrade`; identity by default);
  2. resize them to the latent grid (`low_res_to_latent_grid`, the pipeline's own function);
  3. the UNet (or DiT: its patch embedding takes the extra channels) predicts the noise of the latents from
     [z_t, low-res], concatenated along the channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from ldm.config import RunConfig
from ldm.degrade import degrade
from ldm.images import image_grid
from ldm.models import build_denoiser
from ldm.pipelines.pipeline_common import denoiser_output
from ldm.pipelines.pipeline_latent_superres import LatentSuperResolutionPipeline, low_res_to_latent_grid
from ldm.train import latent_cache
from ldm.train.conditioning import NoConditioning, denoiser_component


class SuperResConditioning(NoConditioning):
    kind = "superres"

    def __init__(self, cfg: RunConfig, train_dataset):
        self.degrade_cfg = cfg.data.degrade
        self.low_res_size = cfg.data.resolution // cfg.data.degrade.factor
        self.train_dataset = train_dataset  # the sample grids upscale its first low-res images

    def build_model(self, cfg: RunConfig, vae: AutoencoderKL) -> nn.Module:
        self.transformer = cfg.denoiser.model.type == "dit"
        return build_denoiser(cfg.denoiser.model, vae, low_res_channels=vae.config.in_channels)

    def model_output(self, model, noisy, timesteps, batch: dict, train: bool) -> torch.Tensor:
        low_res = batch[latent_cache.LOW_RES].to(noisy.device, noisy.dtype)
        if train:
            low_res = degrade(low_res, self.degrade_cfg)
        condition = low_res_to_latent_grid(low_res, tuple(noisy.shape[-2:]))
        return denoiser_output(model, torch.cat([noisy, condition], dim=1), timesteps, transformer=self.transformer)

    def make_pipeline(self, model, vae, scheduler):
        return LatentSuperResolutionPipeline(vae=vae, scheduler=scheduler, **denoiser_component(model),
                                             low_res_size=self.low_res_size)

    def sample_grid(self, pipe, n: int, seed: int, steps: int):
        """Pairs of columns: the low-res input (nearest-neighbour enlarged) | its upscaling."""
        count = max(1, min(n // 2, len(self.train_dataset)))
        low_res = torch.stack([self.train_dataset[i][latent_cache.LOW_RES] for i in range(count)])
        upscaled = pipe(image=(low_res / 2 + 0.5).clamp(0, 1), num_inference_steps=steps, output_type="pt",
                        generator=torch.Generator(device="cpu").manual_seed(seed)).images.cpu()
        shown = F.interpolate((low_res / 2 + 0.5).clamp(0, 1), size=upscaled.shape[-2:], mode="nearest")
        pairs = torch.stack([shown, upscaled], dim=1).flatten(0, 1)
        return image_grid(pipe.to_output(pairs, "pil"), cols=min(8, 2 * count))

    def sample_plan(self, guidance_scale: float | None = None):
        raise NotImplementedError("super-resolution models are measured with `ldm eval --task superres`")
