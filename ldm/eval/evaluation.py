"""Evaluate a trained pipeline (sample quality) and a trained autoencoder (reconstruction quality).

    evaluate_pipeline        N seeded samples -> features -> FID/KID/IS/precision-recall against cached real features
                             (conditional models: equal numbers per class or prompt, and the accuracy on the
                             requested class; see `ldm.eval.conditional`)
    evaluate_reconstructions held-out images -> VAE -> PSNR, SSIM, rFID, precision/recall, LPIPS

Sampling is split between the processes of `accelerate launch` (sample i is drawn with seed + i on whichever
process gets it, so the set does not depend on the process count) and the features are gathered with accelerate.
Every result names the feature network it was measured with.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from ldm.config import DataConfig, bundled, load_config
from ldm.eval import metrics as M

METRIC_NAMES = ("fid", "kid", "is", "pr")
_HEADLINE = {"fid": "FID", "kid": "KID", "is": "IS", "pr": "precision"}  # the one number of each metric choice
HIGHER_IS_BETTER = {"fid": False, "kid": False, "is": True, "pr": True}


def headline_key(network, metric: str) -> str:
    """The result key of `metric`'s main number in `network`'s feature space, e.g. "classifier-FID"."""
    return f"{network.metric_prefix}{_HEADLINE[metric]}"


def resolve_data(data: str, num_channels: int, resolution: int) -> DataConfig:
    """CONFIG_OR_FOLDER -> DataConfig with deterministic transforms.

    A YAML file (or the name of a config that ships with ldm: "digits") gives its `data` section (whose `seed` made
    the held-out split the model was trained without); a folder of images gets the model's channels and resolution
    and split seed 0.
    """
    path = Path(data)
    if path.is_file() or (not path.is_dir() and bundled.shipped(path) is not None):
        data_cfg = load_config(path).data
    elif path.is_dir():
        data_cfg = DataConfig(source="folder", path=str(path), resolution=resolution,
                              color_mode="grayscale" if num_channels == 1 else "rgb")
    else:
        raise FileNotFoundError(f"--data {data!r}: neither a YAML config file, nor a folder of images, nor a config "
                                f"that ships with ldm ({', '.join(bundled.names())})")
    # Metrics compare with the data as it is, not with augmented views.
    return dataclasses.replace(data_cfg, crop="center", random_flip=False)


def load_data(data: str, num_channels: int, resolution: int, match_model: bool = True):
    """(train, holdout, info) of CONFIG_OR_FOLDER, checked against the model's image shape if `match_model`."""
    from ldm.data import build_datasets

    train, holdout, info = build_datasets(resolve_data(data, num_channels, resolution))
    if info.num_train is None or not hasattr(train, "__len__"):
        raise ValueError("evaluation needs a data set of known length: set data.streaming=false")
    if match_model and (info.num_channels, info.resolution) != (num_channels, resolution):
        raise ValueError(f"--data gives {info.num_channels}-channel {info.resolution}px images but the model makes "
                         f"{num_channels}-channel {resolution}px images; set data.color_mode/data.resolution to match")
    return train, holdout, info


def reference_features(network, data_cfg: DataConfig, batch_size: int = 256, device="cpu",
                       cache_dir=None) -> dict[str, torch.Tensor]:
    """Cached features of the training images of `data_cfg`, exactly as `ldm eval --data CONFIG` uses them."""
    from ldm.data import build_datasets
    from ldm.eval.features import cached_real_features, default_cache_dir

    data_cfg = dataclasses.replace(data_cfg, crop="center", random_flip=False)
    train, _, info = build_datasets(data_cfg)
    return cached_real_features(network, train, info.fingerprint, "train", cache_dir or default_cache_dir(),
                                batch_size, device)


@torch.no_grad()
def generate(pipe, indices: list[int], seed: int, num_inference_steps: int, batch_size: int,
             eta: float = 0.0, plan=None) -> tuple[torch.Tensor, float]:
    """Images (N, C, H, W) in [-1, 1] for the given sample indices (image i from seed + i, with the condition that
    `plan` gives it; None: unconditional) and the seconds taken."""
    from ldm.eval.conditional import SamplePlan
    from ldm.pipelines.loading import fit_steps

    plan = plan or SamplePlan.unconditional()
    fit_steps(pipe, num_inference_steps)  # a consistency student asked for more steps than it learned: a warning
    images, start = [], time.perf_counter()
    for i in range(0, len(indices), batch_size):
        chunk = indices[i:i + batch_size]
        generator = [torch.Generator().manual_seed(seed + j) for j in chunk]
        out = pipe(**plan.pipe_kwargs(chunk), generator=generator, num_inference_steps=num_inference_steps, eta=eta,
                   output_type="pt").images
        images.append(out.cpu() * 2 - 1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return (torch.cat(images) if images else torch.empty(0)), elapsed


def sample_metrics(network, real: dict, fake: dict, names: tuple[str, ...] = METRIC_NAMES) -> dict[str, Any]:
    """The chosen metrics of generated features/logits against real ones, keyed with the network's prefix."""
    p = network.metric_prefix
    out: dict[str, Any] = {}
    if "fid" in names:
        out[f"{p}FID"] = M.frechet_distance(real["features"], fake["features"])
    if "kid" in names:
        out[f"{p}KID"], out[f"{p}KID_std"] = M.kernel_distance(real["features"], fake["features"])
    if "pr" in names:
        out[f"{p}precision"], out[f"{p}recall"] = M.precision_recall(real["features"], fake["features"])
    if "is" in names:
        out[f"{p}IS"], out[f"{p}IS_std"] = M.inception_score(fake["logits"])
    if "colour" in real and "colour" in fake:  # RGB: is the model as colourful as the data?
        from ldm.eval.colour import sample_colour

        out.update(sample_colour(real["colour"], fake["colour"]))
    if network.kind == "classifier":
        # Which classes the samples show (and the real images' shares by the same classifier, so that a class it
        # under-predicts on real data does not look missing); where each sample asked for a class, how often it
        # shows that one.
        out.update(M.class_distribution(fake["logits"], real.get("logits")))
        if "requested" in fake:
            from ldm.eval.conditional import requested_class_accuracy

            out.update(requested_class_accuracy(fake["logits"], fake["requested"], network.num_classes))
        if "labels" in real and (real["labels"] >= 0).all():
            out["real_accuracy"] = M.accuracy(real["logits"], real["labels"])
    return out


def evaluate_pipeline(pipe, network, real: dict, num_samples: int, num_inference_steps: int, batch_size: int,
                      seed: int = 0, names: tuple[str, ...] = METRIC_NAMES, eta: float = 0.0,
                      plan=None) -> dict[str, Any]:
    """Sample `num_samples` images (split over processes; `plan`: the condition of each, None: unconditional),
    extract features, gather them and score them.

    All processes return the same result dict.
    """
    from accelerate.utils import gather_object

    from ldm.train.devices import process_state

    state = process_state()
    pipe.set_progress_bar_config(disable=True)
    with state.split_between_processes(list(range(num_samples))) as indices:
        images, seconds = generate(pipe, indices, seed, num_inference_steps, batch_size, eta, plan)
        local = extract_images(network, images, batch_size, state.device)
        requested = plan.requested(indices) if plan is not None else None
        if requested is not None:
            local["requested"] = torch.tensor(requested, dtype=torch.long)
    parts = gather_object([(local, seconds, len(indices))])
    fake = {key: torch.cat([part[0][key] for part in parts]) for key in local}
    per_image = [s / n for _, s, n in parts if n]
    return {
        "feature_network": network.name,
        "scheduler": type(pipe.scheduler).__name__,
        "steps": num_inference_steps,
        "num_samples": num_samples,
        "num_real": len(real["features"]),
        "num_processes": state.num_processes,
        **(plan.describe() if plan is not None else {}),
        "seconds_per_image": sum(per_image) / len(per_image),
        "metrics": sample_metrics(network, real, fake, names),
    }


def extract_images(network, images: torch.Tensor, batch_size: int, device) -> dict[str, torch.Tensor]:
    """Features and logits of an in-memory (N, C, H, W) image tensor in [-1, 1]."""
    from ldm.eval.features import extract

    return extract(network, images.split(batch_size), device)


@torch.no_grad()
def reconstruction_batches(vae, dataset, batch_size: int = 64):
    """Yield (originals, posterior-mean reconstructions) of `dataset` batch by batch, in [-1, 1] on the VAE's device."""
    from ldm.data import build_dataloader

    vae = vae.eval()
    for batch in build_dataloader(dataset, batch_size, shuffle=False, num_workers=0, seed=0, drop_last=False):
        images = batch["pixel_values"].to(vae.device, vae.dtype)
        yield images, vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)


@torch.no_grad()
def evaluate_reconstructions(vae, dataset, batch_size: int = 64, network=None, lpips=None) -> dict[str, Any]:
    """PSNR, SSIM (per image, averaged), colour fidelity (RGB: `ldm.eval.colour`), LPIPS (if `lpips` is given),
    rFID and precision/recall (if `network` is given) of posterior-mean reconstructions of `dataset` (held-out
    images) against the originals."""
    from ldm.eval.colour import ColourAccumulator

    psnrs, ssims, distances, originals, reconstructions = [], [], [], [], []
    colour = ColourAccumulator()
    for images, recon in reconstruction_batches(vae, dataset, batch_size):
        psnrs.append(M.psnr(recon, images).cpu())
        ssims.append(M.ssim(recon, images).cpu())
        if images.shape[1] == 3:  # PSNR and SSIM hardly see a gray reconstruction of coloured objects
            colour.add(images.float().cpu(), recon.float().cpu())
        if lpips is not None:
            distances.append(lpips.to(images.device)(recon, images).flatten().cpu())
        if network is not None:
            originals.append(images.cpu())
            reconstructions.append(recon.cpu())
    out: dict[str, Any] = {"psnr": torch.cat(psnrs).mean().item(), "ssim": torch.cat(ssims).mean().item(),
                           "num_images": len(dataset)}
    out.update(colour.result())
    if lpips is not None:
        out["lpips"] = torch.cat(distances).mean().item()
    if network is not None:
        device = vae.device
        real = extract_images(network, torch.cat(originals), batch_size, device)
        fake = extract_images(network, torch.cat(reconstructions), batch_size, device)
        out[f"{network.metric_prefix}rFID"] = M.frechet_distance(real["features"], fake["features"])
        if len(dataset) > 3:  # the k = 3 nearest-neighbour balls need more points
            # Recall: share of the originals that the reconstructions' manifold covers (lost detail lowers it).
            p, r = M.precision_recall(real["features"], fake["features"])
            out[f"{network.metric_prefix}precision"], out[f"{network.metric_prefix}recall"] = p, r
        out["feature_network"] = network.name
    return out


def format_table(result: dict[str, Any]) -> str:
    """A two-column text table of a result dict; lists (class fractions) on one line."""
    rows = [(k, v) for k, v in result.items() if k != "metrics"] + list(result.get("metrics", {}).items())
    width = max(len(k) for k, _ in rows)

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return " ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v)
        return str(v)

    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in rows)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
