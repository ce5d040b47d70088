"""Stage 1: train the KL autoencoder, then measure its latents' scale and its held-out reconstruction quality."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from torch import nn

from ldm.config import RunConfig
from ldm.data import build_dataloader, build_datasets, collate
from ldm.images import image_grid
from ldm.losses import vae_loss
from ldm.models import PatchDiscriminator, build_vae, vae_downsampling_factor
from ldm.pipelines import latents
from ldm.train import best, pretrained
from ldm.train.ema import ema_weights
from ldm.train.spine import check_trackers, fit

_postprocess = VaeImageProcessor(do_normalize=True).postprocess


class KLAutoencoder(nn.Module):
    """AutoencoderKL whose forward also returns the posterior, which the KL term needs.

    Training goes through forward() so that a DDP wrapper sees the call and synchronises gradients.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor):
        posterior = self.vae.encode(images).latent_dist
        reconstructions = self.vae.decode(posterior.sample()).sample
        # Under mixed precision the moments come out in bf16/fp16; the KL sums every latent element: float32.
        return reconstructions, DiagonalGaussianDistribution(posterior.parameters.float())


def metric_key(metric: str, network) -> str:
    """The key of vae.eval_metric in `evaluate_reconstructions`' result (rfid/recall in the network's feature space)."""
    return {"rfid": f"{getattr(network, 'metric_prefix', '')}rFID",
            "recall": f"{getattr(network, 'metric_prefix', '')}recall"}.get(metric, metric)


class VAETask:
    name = "vae"

    def __init__(self, cfg: RunConfig, train_dataset, holdout_dataset, num_channels: int, resolution: int,
                 borrowed=None):
        self.cfg = cfg
        self.pretrained = borrowed  # a ldm.train.pretrained.Pretrained (vae.pretrained), else None: train one
        self.loss_cfg = cfg.vae.loss
        self.train_dataset = train_dataset
        self.holdout_dataset = holdout_dataset
        self.num_channels = num_channels
        self.resolution = resolution
        self.perceptual = None
        if self.loss_cfg.perceptual_weight > 0:
            # Loaded before any training so a missing weights file fails in seconds.
            from ldm.lpips import LPIPS

            self.perceptual = LPIPS.from_file(self.loss_cfg.lpips_weights)
        self.eval_network = None  # classifier features for the held-out rFID; loaded now, so a bad path fails at once
        if cfg.vae.eval_features:
            from ldm.eval.features import ClassifierFeatures

            self.eval_network = ClassifierFeatures(cfg.vae.eval_features)
        self.preview = self._preview_images()
        self.disc_start = self.loss_cfg.disc_start  # a step; set_run_length resolves a fraction
        # The chroma term's default block: one latent pixel's footprint (ldm.losses.chroma_loss).
        self.chroma_block = (borrowed.source.downsampling_factor if borrowed is not None
                             else vae_downsampling_factor(cfg.vae.model))
        self.best_dir = Path(cfg.output_dir) / "vae" / "best"
        # The score of vae/best/ to beat: the resumed run's, if it was measured by the same metric.
        self.best = best.resumed_best(self.best_dir.parent, cfg.vae.train,
                                      metric_key(cfg.vae.eval_metric, self.eval_network))
        self.on_evaluation = None  # called as (step, held-out scores) after each evaluation (ldm.train.run_budget)

    def _preview_images(self) -> torch.Tensor:
        source = self.holdout_dataset if self.holdout_dataset is not None and len(self.holdout_dataset) else None
        source = source or self.train_dataset
        if isinstance(source, torch.utils.data.IterableDataset):  # a stream (data.streaming): its first images
            first = itertools.islice(source, self.cfg.vae.train.num_sample_images)
            return torch.stack([example["pixel_values"] for example in first])
        n = min(self.cfg.vae.train.num_sample_images, len(source))
        return torch.stack([source[i]["pixel_values"] for i in range(n)])

    def build_modules(self) -> dict[str, nn.Module]:
        vae = (self.pretrained.for_finetuning() if self.pretrained is not None
               else build_vae(self.cfg.vae.model, self.num_channels, self.resolution))
        modules: dict[str, nn.Module] = {"model": KLAutoencoder(vae)}
        if self.loss_cfg.disc_weight > 0:
            modules["discriminator"] = PatchDiscriminator(self.num_channels, num_layers=self.loss_cfg.disc_layers)
        return modules

    def learning_rate(self, module_name: str, default: float) -> float:
        if module_name == "discriminator" and self.loss_cfg.disc_learning_rate is not None:
            return self.loss_cfg.disc_learning_rate
        return default

    def attach(self, accelerator, modules: dict[str, nn.Module]) -> None:
        self.accelerator = accelerator
        self.modules = modules
        if self.perceptual is not None:
            self.perceptual.to(accelerator.device)

    def set_run_length(self, total_steps: int | None) -> None:
        """vae.loss.disc_start below 1 is a fraction of the run: of max_steps, or of the steps a time budget plans
        (unknown while its probe times the first steps: the discriminator waits)."""
        if self.loss_cfg.disc_start < 1:
            self.disc_start = math.inf if total_steps is None else int(self.loss_cfg.disc_start * total_steps)

    def compute_loss(self, batch: dict, step: int):
        images = batch["pixel_values"]
        reconstructions, posterior = self.modules["model"](images)
        discriminator = self.modules.get("discriminator")
        return vae_loss(
            self.loss_cfg,
            images,
            reconstructions,
            posterior,
            step,
            last_layer=self.accelerator.unwrap_model(self.modules["model"]).vae.decoder.conv_out.weight,
            perceptual=self.perceptual,
            discriminator=discriminator,
            discriminator_for_generator=self.accelerator.unwrap_model(discriminator) if discriminator else None,
            disc_start=self.disc_start,
            chroma_block=self.chroma_block,
        )

    @torch.no_grad()
    def sample_grid(self, model: KLAutoencoder, step: int) -> Image.Image:
        """Held-out originals, each row of them followed by a row of their reconstructions."""
        images = self.preview.to(model.vae.device)
        recon = model.vae.decode(model.vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
        cols = min(len(images), 8)
        # Interleave rows of `cols` originals with the rows of their reconstructions.
        rows = [t for i in range(0, len(images), cols) for t in (images[i:i + cols], recon[i:i + cols])]
        return image_grid(_postprocess(torch.cat(rows).float().cpu(), output_type="pil"), cols=cols)

    def evaluate_holdout(self, vae: AutoencoderKL) -> dict[str, Any]:
        """PSNR, SSIM, LPIPS (when the loss has its weights), rFID and recall (when vae.eval_features is set) of the
        held-out reconstructions."""
        from ldm.eval.evaluation import evaluate_reconstructions

        return evaluate_reconstructions(vae, self.holdout_dataset, self.cfg.vae.train.batch_size, self.eval_network,
                                        self.perceptual)

    @torch.no_grad()
    def evaluate(self, accelerator, model, ema, step: int) -> dict[str, Any] | None:
        """Score the held-out reconstructions of the weights being trained (EMA weights when use_ema), log them as
        eval/*, and save the autoencoder as vae/best/ when vae.eval_metric improves. The main process evaluates."""
        error = None
        if accelerator.is_main_process and self.holdout_dataset is not None and len(self.holdout_dataset):
            with ema_weights(accelerator, model, ema) as evaluated:
                result = self.evaluate_holdout(evaluated.vae)
                accelerator.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}, step=step)
                metric = self.cfg.vae.eval_metric
                key = metric_key(metric, self.eval_network)
                value = result[key]
                if self.on_evaluation is not None:
                    self.on_evaluation(step, result)
                if best.improves(value, self.best, higher_is_better=metric != "rfid"):
                    self.best = value
                    error = best.try_write(self.best_dir, evaluated.vae.save_pretrained,
                                           {"step": step, "metric": key, "value": value, **result})
        best.raise_if_failed(accelerator, self.best_dir, error)
        accelerator.wait_for_everyone()

    def _latent_statistics(self, vae: AutoencoderKL) -> dict[str, float | None]:
        """scaling_factor (and, for a pretrained autoencoder, shift_factor) to store in the saved config."""
        train_cfg = self.cfg.vae.train
        loader = build_dataloader(self.train_dataset, train_cfg.batch_size, shuffle=True, num_workers=0,
                                  seed=train_cfg.seed, drop_last=False)
        if self.pretrained is not None:
            return self.pretrained.statistics(vae, loader)
        return {"scaling_factor": latents.measure_scaling_factor(vae, loader, self.cfg.vae.scaling_samples)}

    def _finish_best(self) -> None:
        """vae/best/ was saved mid-run, when measuring its latents would have advanced the training data's random
        augmentation: its scaling factor is measured now, as the final model's is."""
        if not (self.best_dir / "config.json").is_file():
            return
        vae = AutoencoderKL.from_pretrained(self.best_dir, use_safetensors=True)
        vae.register_to_config(**self._latent_statistics(vae))
        best.write(self.best_dir, vae.save_pretrained, json.loads((self.best_dir / best.METRICS).read_text()))

    def finish(self, model: KLAutoencoder) -> dict[str, Any]:
        vae = model.vae.eval()
        statistics = self._latent_statistics(vae)
        vae.register_to_config(**statistics)
        metrics: dict[str, Any] = dict(statistics)
        if self.pretrained is not None:
            metrics.update(self.pretrained.summary())
        if self.holdout_dataset is not None and len(self.holdout_dataset):
            held_out = self.evaluate_holdout(vae)
            held_out["num_holdout_images"] = held_out.pop("num_images")
            metrics.update({k if k.startswith(("num_", "feature_")) else f"holdout_{k}": v for k, v in held_out.items()})
        self._finish_best()
        train_cfg = self.cfg.vae.train
        out = Path(self.cfg.output_dir) / "vae" / "model"
        vae.save_pretrained(out, safe_serialization=True)
        (out.parent / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self.sample_grid(model, train_cfg.max_steps).save(out.parent / "reconstructions.png")
        return metrics


def train_vae(cfg: RunConfig, budget=None) -> dict[str, Any]:
    """Train the autoencoder of `cfg`, or take vae.pretrained (fine-tuning its decoder with vae.finetune); writes
    <output_dir>/vae/model (diffusers AutoencoderKL) and metrics.json. `budget`: a TimeBudget made by the caller
    (ldm.train.run_budget's), which sees every held-out evaluation (its `observe`)."""
    check_trackers(cfg.vae.train, "vae")
    source = pretrained.check(cfg) if cfg.vae.pretrained else None  # before any download or data work
    train_dataset, holdout_dataset, info = build_datasets(cfg.data)
    borrowed = pretrained.Pretrained.load(cfg, source, info) if source else None
    task = VAETask(cfg, train_dataset, holdout_dataset, info.num_channels, info.resolution, borrowed)
    task.on_evaluation = getattr(budget, "observe", None)
    if borrowed is not None and cfg.vae.finetune == "none":
        metrics = pretrained.use_as_is(task, cfg, KLAutoencoder(borrowed.vae))
    else:
        metrics = fit(task, cfg, cfg.vae.train, train_dataset, collate, budget=budget)
    if metrics:
        print(f"VAE saved to {Path(cfg.output_dir) / 'vae' / 'model'}")
        if borrowed is not None:
            print(pretrained.statistics_line(metrics))
        else:
            print(f"  scaling_factor = {metrics['scaling_factor']:.4f} (1/std of latents)")
        if "holdout_psnr" in metrics:
            print(f"  held-out PSNR  = {metrics['holdout_psnr']:.2f} dB over {metrics['num_holdout_images']} images")
            for key, value in metrics.items():  # SSIM, LPIPS, rFID
                if key.startswith("holdout_") and key != "holdout_psnr":
                    print(f"  held-out {key[len('holdout_'):]:<6}= {value:.4f}")
            if "feature_network" in metrics:
                print(f"  rFID features: {metrics['feature_network']}")
    return metrics
