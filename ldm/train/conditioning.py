"""What the UNet stage conditions on (`denoiser.conditioning`): nothing, class labels, or captions.

Each conditioning supplies the UNet stage with the parts that differ between them:
  build_model    the trained network (a UNet2DModel; for text, a UNet2DConditionModel, with the from-scratch text
                 encoder inside one module so that DDP, EMA, clipping and checkpoints cover both)
  model_output   the network's prediction for a noisy batch, with condition dropout while training
  make_pipeline  the pipeline that is sampled and saved (LatentDiffusionPipeline, or a stock StableDiffusionPipeline)
  sample_grid    the grid of samples written during training: one row per class (or per prompt)
  sample_plan    which condition each evaluation sample gets (`ldm.eval.conditional.SamplePlan`)
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from ldm.config import ConfigError, RunConfig
from ldm.data import DataInfo
from ldm.images import image_grid
from ldm.models import build_unet
from ldm.pipelines import LatentDiffusionPipeline


class NoConditioning:
    kind = "none"

    def build_model(self, cfg: RunConfig, vae: AutoencoderKL) -> nn.Module:
        return build_unet(cfg.denoiser.model, vae)

    def attach(self, device: torch.device) -> None:
        pass

    def model_output(self, model, noisy, timesteps, batch: dict, train: bool) -> torch.Tensor:
        return model(noisy, timesteps).sample

    def make_pipeline(self, model, vae, scheduler):
        return LatentDiffusionPipeline(vae=vae, unet=model, scheduler=scheduler)

    def sample_grid(self, pipe, n: int, seed: int, steps: int):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return image_grid(pipe(batch_size=n, generator=generator, num_inference_steps=steps).images)

    def sample_plan(self, guidance_scale: float | None = None):
        from ldm.eval.conditional import SamplePlan

        return SamplePlan.unconditional()


class ClassConditioning(NoConditioning):
    """Class labels through the UNet2DModel's class embedding; the null class id is num_classes."""

    kind = "class"

    def __init__(self, num_classes: int, class_names: list[str] | None, cond_dropout: float, guidance_scale: float):
        self.num_classes, self.class_names = num_classes, class_names
        self.cond_dropout, self.guidance_scale = cond_dropout, guidance_scale

    def build_model(self, cfg: RunConfig, vae: AutoencoderKL) -> nn.Module:
        return build_unet(cfg.denoiser.model, vae, num_classes=self.num_classes)

    def model_output(self, model, noisy, timesteps, batch: dict, train: bool) -> torch.Tensor:
        labels = batch["label"]
        if train and self.cond_dropout > 0:
            # Condition dropout: the same network learns p(x | ∅), the other branch of classifier-free guidance.
            dropped = torch.rand(labels.shape, device=labels.device) < self.cond_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.num_classes), labels)
        return model(noisy, timesteps, class_labels=labels).sample

    def make_pipeline(self, model, vae, scheduler):
        # The scale of the grids and evaluations is saved with the model: `ldm sample`/`eval`, the demo and the
        # pipeline itself use it when no scale is given.
        return LatentDiffusionPipeline(vae=vae, unet=model, scheduler=scheduler, class_names=self.class_names,
                                       guidance_scale=self.guidance_scale)

    def sample_grid(self, pipe, n: int, seed: int, steps: int):
        """One row per class, n // classes images each (at least one)."""
        per_class = max(1, n // self.num_classes)
        labels = [k for k in range(self.num_classes) for _ in range(per_class)]
        images = pipe(class_labels=labels, guidance_scale=self.guidance_scale,
                      generator=torch.Generator(device="cpu").manual_seed(seed), num_inference_steps=steps).images
        return image_grid(images, cols=per_class)

    def sample_plan(self, guidance_scale: float | None = None):
        from ldm.eval.conditional import SamplePlan

        return SamplePlan.classes(self.num_classes, self.guidance_scale if guidance_scale is None else guidance_scale)


def check_labels(info: DataInfo, data_name: str) -> None:
    if info.num_classes is None:
        raise ConfigError(f"denoiser.conditioning=class needs class labels, and data {data_name!r} has none: use class "
                          "sub-folders (data.source=folder), set data.label_column (hub), or train unconditionally")


def make_conditioning(cfg: RunConfig, info: DataInfo, train_dataset, stage_dir: Path):
    """The conditioning of `cfg` for data described by `info` (whose labels/captions were checked to exist)."""
    kind = cfg.denoiser.conditioning
    if kind == "none":
        return NoConditioning()
    if kind == "class":
        check_labels(info, cfg.data.path or cfg.data.source)
        return ClassConditioning(info.num_classes, info.class_names, cfg.denoiser.diffusion.cond_dropout,
                                 cfg.denoiser.guidance_scale)
    from ldm.train.text_conditioning import TextConditioning

    return TextConditioning.create(cfg, info, train_dataset, stage_dir)
