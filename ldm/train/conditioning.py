"""What the UNet stage conditions on (`denoiser.conditioning`): nothing, class labels, or captions.

Each conditioning supplies the UNet stage with the parts that differ between them:
  build_model    the trained network of denoiser.model.type (a UNet2DModel or a DiT; for text, a UNet2DConditionModel
                 or PixArt's transformer, with the from-scratch text encoder inside one module so that DDP, EMA,
                 clipping and checkpoints cover both)
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
from ldm.models import build_denoiser
from ldm.pipelines import LatentDiffusionPipeline
from ldm.pipelines.pipeline_common import DIT_PIPELINE_NULL_CLASS, denoiser_output, dit_pipeline_problem


def is_transformer(model: nn.Module) -> bool:
    """Whether an (unwrapped) denoiser is one of diffusers' latent transformers (`ldm.dit`) rather than a UNet."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    return isinstance(model, (DiTTransformer2DModel, PixArtTransformer2DModel))


def denoiser_component(model: nn.Module) -> dict[str, nn.Module]:
    """The pipeline argument that holds `model`: `transformer` (diffusers' name in DiT pipelines) or `unet`."""
    return {"transformer" if is_transformer(model) else "unet": model}


class NoConditioning:
    kind = "none"
    transformer = False  # whether the network built is a DiT (set by build_model; DDP hides the class later)

    def build_model(self, cfg: RunConfig, vae: AutoencoderKL) -> nn.Module:
        self.transformer = cfg.denoiser.model.type == "dit"
        return build_denoiser(cfg.denoiser.model, vae)

    def attach(self, device: torch.device) -> None:
        pass

    def model_output(self, model, noisy, timesteps, batch: dict, train: bool) -> torch.Tensor:
        return denoiser_output(model, noisy, timesteps, transformer=self.transformer)

    def make_pipeline(self, model, vae, scheduler):
        return LatentDiffusionPipeline(vae=vae, scheduler=scheduler, **denoiser_component(model))

    def sample_grid(self, pipe, n: int, seed: int, steps: int):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return image_grid(pipe(batch_size=n, generator=generator, num_inference_steps=steps).images)

    def sample_plan(self, guidance_scale: float | None = None):
        from ldm.eval.conditional import SamplePlan

        return SamplePlan.unconditional()


class ClassConditioning(NoConditioning):
    """Class labels through the class embedding of the UNet2DModel (null class id: num_classes) or of the DiT (its
    last embedding: DiTPipeline's 1000 when built for it, `stock_dit`)."""

    kind = "class"

    def __init__(self, num_classes: int, class_names: list[str] | None, cond_dropout: float, guidance_scale: float):
        self.num_classes, self.class_names = num_classes, class_names
        self.cond_dropout, self.guidance_scale = cond_dropout, guidance_scale
        self.null_class = num_classes  # the last class embedding; DiTPipeline's 1000 for a DiT built for it

    def build_model(self, cfg: RunConfig, vae: AutoencoderKL) -> nn.Module:
        self.transformer = cfg.denoiser.model.type == "dit"
        if stock_dit(cfg, vae, self.num_classes):
            self.null_class = DIT_PIPELINE_NULL_CLASS
        return build_denoiser(cfg.denoiser.model, vae, num_classes=self.num_classes, class_embeddings=self.null_class)

    def model_output(self, model, noisy, timesteps, batch: dict, train: bool) -> torch.Tensor:
        labels = batch["label"]
        if train and self.cond_dropout > 0:
            # Condition dropout: the same network learns p(x | ∅), the other branch of classifier-free guidance.
            dropped = torch.rand(labels.shape, device=labels.device) < self.cond_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_class), labels)
        return denoiser_output(model, noisy, timesteps, labels, transformer=self.transformer)

    def make_pipeline(self, model, vae, scheduler):
        # The scale of the grids and evaluations is saved with the model: `ldm sample`/`eval`, the demo and the
        # pipeline itself use it when no scale is given.
        return LatentDiffusionPipeline(vae=vae, scheduler=scheduler, **denoiser_component(model),
                                       class_names=self.class_names, guidance_scale=self.guidance_scale,
                                       num_classes=self.num_classes)

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


def stock_dit(cfg: RunConfig, vae: AutoencoderKL, num_classes: int) -> bool:
    """Whether a class DiT is built for diffusers' DiTPipeline (`DIT_PIPELINE_NULL_CLASS` class embeddings):
    denoiser.model.stock_pipeline true, or null and the model fits (`ldm.pipelines.pipeline_common.dit_pipeline_problem`). True with a
    model that cannot fit is a ConfigError; `load_vae_and_data` asks before any work, once the VAE is loaded."""
    m = cfg.denoiser.model
    if m.type != "dit" or cfg.denoiser.conditioning != "class" or m.stock_pipeline is False:
        return False
    if cfg.denoiser.diffusion.objective == "flow":  # refused with stock_pipeline=true by ldm.config.validation
        return False
    problem = dit_pipeline_problem(vae, num_classes)
    if problem is not None and m.stock_pipeline:
        raise ConfigError(f"denoiser.model.stock_pipeline=true asks for a model that diffusers' DiTPipeline loads and "
                          f"samples, but it cannot sample this one: {problem}. Set denoiser.model.stock_pipeline null "
                          "to save the model for ldm's pipeline alone (or use an autoencoder without shift_factor: "
                          "train_vae.py's own have none)")
    return problem is None


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
