"""Stage 1 from a published autoencoder (`vae.pretrained`): used as it is, or with its decoder fine-tuned.

Used as it is, nothing is trained: the autoencoder is checked on the held-out images (as a trained one is), its
latents are measured on the training images, and it is written to vae/model like a trained one, so the UNet stage,
the latent cache, every pipeline and `ldm eval-vae` take it unchanged. With `vae.finetune: decoder` the spine trains
its decoder with vae.loss (as `sd-vae-ft-mse` was made); the encoder and its quant_conv are frozen, so the latents
stay bitwise the same and a UNet trained on them stays valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from ldm import pretrained_vae
from ldm.config import RunConfig, save_config
from ldm.pipelines import latents
from ldm.train.devices import configure_backends, use_cpu


def check(cfg: RunConfig) -> pretrained_vae.PretrainedSource:
    """ConfigErrors naming the key, from the repository's file list and config alone (no weights, no data)."""
    return pretrained_vae.check_pretrained(cfg, 3 if cfg.data.color_mode == "rgb" else 1)


class Pretrained:
    """The loaded autoencoder with where it came from: what VAETask needs to fine-tune, measure and describe it."""

    def __init__(self, cfg: RunConfig, source: pretrained_vae.PretrainedSource, vae: AutoencoderKL):
        self.cfg, self.source, self.vae = cfg, source, vae
        self.grayscale = vae.config.in_channels != source.config.get("in_channels", 3)
        self.measured: tuple[float, float] | None = None  # (mean, std) of the unscaled latents, once measured

    @classmethod
    def load(cls, cfg: RunConfig, source: pretrained_vae.PretrainedSource, info) -> Pretrained:
        vae = pretrained_vae.prepare(source, info.num_channels, info.resolution)
        borrowed = cls(cfg, source, vae)
        f, c = source.downsampling_factor, vae.config.latent_channels
        r = info.resolution // f
        print(f"pretrained autoencoder {source.describe()}: f={f}, latents {r}x{r}x{c}"
              + (" (RGB autoencoder on grayscale data: gray -> 3 equal channels in, channel mean out)"
                 if borrowed.grayscale else ""))
        return borrowed

    def for_finetuning(self) -> AutoencoderKL:
        """The autoencoder with its encoder side frozen: only the decoder (post_quant_conv + decoder) trains."""
        self.vae.requires_grad_(False)
        self.vae.post_quant_conv.requires_grad_(True)
        self.vae.decoder.requires_grad_(True)
        return self.vae.train()

    def statistics(self, vae: AutoencoderKL, loader) -> dict[str, float | None]:
        """scaling_factor and shift_factor by vae.latent_stats; the latents' mean and std are measured either way
        (the model card shows them beside the publisher's)."""
        self.measured = latents.measure_latent_statistics(vae, loader, self.cfg.vae.scaling_samples)
        return pretrained_vae.chosen_statistics(self.cfg.vae.latent_stats, self.publisher, *self.measured)

    @property
    def publisher(self) -> dict[str, float | None]:
        return pretrained_vae.publisher_statistics(self.source)

    def summary(self) -> dict[str, Any]:
        """What vae/metrics.json (and from it the model card) records about the borrowed autoencoder."""
        mean, std = self.measured if self.measured is not None else (None, None)
        return {"pretrained": self.source.describe(), "finetune": self.cfg.vae.finetune,
                "latent_stats": self.cfg.vae.latent_stats,
                "publisher_scaling_factor": self.publisher["scaling_factor"],
                "publisher_shift_factor": self.publisher["shift_factor"],
                "measured_latent_mean": mean, "measured_latent_std": std,
                "downsampling_factor": self.source.downsampling_factor,
                "latent_channels": self.vae.config.latent_channels, "grayscale_converted": self.grayscale}


def use_as_is(task, cfg: RunConfig, model: torch.nn.Module) -> dict[str, Any]:
    """No training: the held-out check, the latent statistics and vae/model, as `task.finish` writes them after
    training (on the GPU when there is one and vae.train.cpu is off)."""
    train_cfg = cfg.vae.train
    device = torch.device("cpu" if use_cpu(train_cfg) or not torch.cuda.is_available() else "cuda")
    configure_backends(train_cfg, device)
    stage_dir = Path(cfg.output_dir) / "vae"
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, stage_dir / "config.yaml")
    return task.finish(model.to(device))


def statistics_line(metrics: dict[str, Any]) -> str:
    """The stored scale and shift beside the publisher's, for the end of train_vae.py."""
    def show(value):
        return "none" if value is None else f"{value:.4f}"

    how = "measured on the training images" if metrics["latent_stats"] == "measure" else "the publisher's"
    return (f"  scaling_factor = {show(metrics['scaling_factor'])}, shift_factor = {show(metrics['shift_factor'])} "
            f"({how}; publisher: {show(metrics['publisher_scaling_factor'])}, "
            f"{show(metrics['publisher_shift_factor'])}; latents measured: mean {show(metrics['measured_latent_mean'])}"
            f", std {show(metrics['measured_latent_std'])})")
