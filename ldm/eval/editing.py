"""Measure the editing tasks on held-out images (`ldm eval --task superres|inpaint|img2img`).

    superres  PSNR, SSIM and FID-family scores of the upscaled held-out low-res images, beside bicubic upscaling of
              the same inputs and beside the held-out originals themselves (the floor of the FID at this N)
    inpaint   for centre and random masks: FID-family scores of the completed images, and PSNR outside the mask with
              paste-back (exact: the kept pixels are the input's) and without (the autoencoder's error); beside
              the scores of as many unmasked samples of the same model
    img2img   for each strength: PSNR to the input and FID-family scores (a CSV and a plot)

Image k is edited with seed + k. FID-family scores compare with the features of the data's training images, as
`ldm eval` does; all variants of one table use the same number of images, so they compare with each other.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ldm.eval import metrics as M
from ldm.eval.evaluation import extract_images, generate, sample_metrics


def holdout_tensors(holdout, num_images: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `num_images` held-out images in [-1, 1] and, for super-resolution data, their low-res versions."""
    rows = [holdout[i] for i in range(min(num_images, len(holdout)))]
    images = torch.stack([r["pixel_values"] for r in rows])
    low_res = torch.stack([r["low_res"] for r in rows]) if "low_res" in rows[0] else None
    return images, low_res


def _run(pipe, inputs: dict[str, torch.Tensor], seed: int, batch_size: int, **kwargs) -> tuple[torch.Tensor, float]:
    """Call `pipe` over batches of per-image tensors (image k with seed + k); (images in [-1, 1], seconds)."""
    outputs, start = [], time.perf_counter()
    n = len(next(iter(inputs.values())))
    for i in range(0, n, batch_size):
        batch = {k: v[i:i + batch_size] for k, v in inputs.items()}
        generator = [torch.Generator().manual_seed(seed + j) for j in range(i, min(i + batch_size, n))]
        out = pipe(**batch, **kwargs, generator=generator, output_type="pt").images
        outputs.append(out.cpu() * 2 - 1)
    return torch.cat(outputs), time.perf_counter() - start


def _scores(network, real: dict, images: torch.Tensor, references: torch.Tensor | None, batch_size: int,
            device) -> dict[str, Any]:
    fake = extract_images(network, images, batch_size, device)
    out = {k: v for k, v in sample_metrics(network, real, fake, ("fid", "kid")).items() if not isinstance(v, list)}
    if references is not None:
        out["psnr"] = M.psnr(images, references).mean().item()
        out["ssim"] = M.ssim(images, references).mean().item()
    return out


def bicubic_upscale(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """PIL's bicubic enlargement (a = -0.5, the filter ldm's data transform resizes with) of 8-bit images in
    [-1, 1]; torch's bicubic (a = -0.75) is reported beside it as "bicubic_torch"."""
    import numpy as np
    from PIL import Image

    pixels = ((low_res.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    mode = "L" if pixels.shape[-1] == 1 else "RGB"
    big = [np.asarray(Image.fromarray(p.squeeze(-1) if mode == "L" else p, mode).resize(
        (size, size), Image.Resampling.BICUBIC), dtype=np.float32) for p in pixels]
    out = torch.from_numpy(np.stack(big)) / 127.5 - 1
    return out[:, None] if mode == "L" else out.permute(0, 3, 1, 2)


def evaluate_superres(pipe, network, real: dict, images: torch.Tensor, low_res: torch.Tensor, steps: int,
                      batch_size: int, seed: int, device) -> dict[str, Any]:
    """LDM-SR, bicubic and the originals, scored alike."""
    upscaled, seconds = _run(pipe, {"image": (low_res / 2 + 0.5).clamp(0, 1)}, seed, batch_size,
                             num_inference_steps=steps)
    bicubic = bicubic_upscale(low_res, images.shape[-1])
    bicubic_torch = F.interpolate(low_res, size=images.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    return {
        "num_images": len(images),
        "low_res_size": low_res.shape[-1],
        "seconds_per_image": seconds / len(images),
        "ldm": _scores(network, real, upscaled, images, batch_size, device),
        "bicubic": _scores(network, real, bicubic, images, batch_size, device),
        "bicubic_torch": _scores(network, real, bicubic_torch, images, batch_size, device),
        "originals": _scores(network, real, images, None, batch_size, device),
        "_images": {"low_res": low_res, "bicubic": bicubic, "ldm": upscaled, "original": images},
    }


def make_masks(kind: str, num_images: int, size: int, seed: int = 0) -> torch.Tensor:
    """(N, 1, size, size) masks, 1 = fill: "centre" is the middle half of each side (a quarter of the image);
    "random" is one rectangle per image with sides in [size/4, 3 size/4] at a random place (seeded)."""
    masks = torch.zeros(num_images, 1, size, size)
    if kind == "centre":
        a, b = size // 4, size - size // 4
        masks[..., a:b, a:b] = 1
        return masks
    if kind != "random":
        raise ValueError(f"masks: unknown mask kind {kind!r}; use centre or random")
    g = torch.Generator().manual_seed(seed)
    for i in range(num_images):
        h, w = (int(v) for v in torch.randint(size // 4, 3 * size // 4 + 1, (2,), generator=g))
        top, left = int(torch.randint(0, size - h + 1, (1,), generator=g)), int(torch.randint(0, size - w + 1, (1,), generator=g))
        masks[i, :, top:top + h, left:left + w] = 1
    return masks


def psnr_outside(images: torch.Tensor, references: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """(mean PSNR in dB over the kept pixels, on the [0, 1] scale, capped at 100 dB as `metrics.psnr`; the largest
    absolute difference there)."""
    keep = (1 - masks).expand_as(images).double()
    diff = ((images.double() - references.double()) / 2) * keep
    mse = diff.square().flatten(1).sum(1) / keep.flatten(1).sum(1)
    psnr = (10 * torch.log10(1 / mse.clamp_min(1e-10))).clamp_max(100.0)
    return psnr.mean().item(), diff.abs().max().item()


def evaluate_inpaint(pipe, sampler, network, real: dict, images: torch.Tensor, mask_kinds: list[str], steps: int,
                     jump_length: int, jump_n_sample: int, batch_size: int, seed: int, device) -> dict[str, Any]:
    """Completed images per mask kind (with and without paste-back), and unmasked samples of `sampler`."""
    result: dict[str, Any] = {"num_images": len(images), "jump_length": jump_length, "jump_n_sample": jump_n_sample}
    shown = {"original": images}
    for kind in mask_kinds:
        masks = make_masks(kind, len(images), images.shape[-1], seed)
        inputs = {"image": (images / 2 + 0.5).clamp(0, 1), "mask_image": masks}
        common = {"num_inference_steps": steps, "jump_length": jump_length, "jump_n_sample": jump_n_sample}
        pasted, seconds = _run(pipe, inputs, seed, batch_size, paste_back=True, **common)
        raw, _ = _run(pipe, inputs, seed, batch_size, paste_back=False, **common)
        scores = _scores(network, real, pasted, None, batch_size, device)
        scores["psnr_outside_mask"], scores["max_abs_diff_outside_mask"] = psnr_outside(pasted, images, masks)
        scores["psnr_outside_mask_no_paste_back"], _ = psnr_outside(raw, images, masks)
        scores["seconds_per_image"] = seconds / len(images)
        result[kind] = scores
        shown[f"{kind}_mask"], shown[kind] = (masks * 2 - 1).expand_as(images), pasted
    samples, _ = generate(sampler, list(range(len(images))), seed, steps, batch_size)
    result["unmasked_samples"] = _scores(network, real, samples, None, batch_size, device)
    result["_images"] = shown
    return result


def evaluate_img2img(pipe, network, real: dict, images: torch.Tensor, strengths: list[float], steps: int,
                     batch_size: int, seed: int, device) -> dict[str, Any]:
    """One row per strength: PSNR/SSIM to the input and FID-family scores of the outputs."""
    rows, shown = [], {"input": images}
    for strength in strengths:
        out, seconds = _run(pipe, {"image": (images / 2 + 0.5).clamp(0, 1)}, seed, batch_size,
                            strength=strength, num_inference_steps=steps)
        rows.append({"strength": strength, **_scores(network, real, out, images, batch_size, device),
                     "seconds_per_image": seconds / len(images)})
        shown[f"strength {strength:g}"] = out
    return {"num_images": len(images), "rows": rows, "_images": shown}


def write_rows_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_strength(rows: list[dict[str, Any]], fid_key: str, path: str | Path) -> None:
    """Two panels against strength: PSNR to the input, and the FID-family score."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    strengths = [r["strength"] for r in rows]
    for ax, key, label in ((axes[0], "psnr", "PSNR to the input (dB)"), (axes[1], fid_key, fid_key)):
        ax.plot(strengths, [r[key] for r in rows], marker="o")
        ax.set_xlabel("strength")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"img2img on {rows[0].get('num_images', '')} held-out images".replace("on  ", "on "), fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(shown: dict[str, torch.Tensor], count: int, path: str | Path) -> None:
    """A PNG with one column per entry of `shown` (low-res inputs enlarged, nearest) and `count` rows."""
    from diffusers.utils.pil_utils import numpy_to_pil

    from ldm.images import image_grid

    size = max(v.shape[-1] for v in shown.values())
    columns = [F.interpolate(((v[:count] + 1) / 2).clamp(0, 1), size=(size, size), mode="nearest")
               for v in shown.values()]
    cells = torch.stack(columns, dim=1).flatten(0, 1)
    pil = numpy_to_pil(cells.permute(0, 2, 3, 1).numpy())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(pil, cols=len(columns)).save(path)
