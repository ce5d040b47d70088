"""Is flipping cached latents the same as encoding flipped images? (It decides what the latent cache stores.)

A horizontal flip of the images (data.random_flip) could be applied to cached latents instead of encoding both
orientations, if the encoder were mirror-equivariant: flip(E(x)) == E(flip(x)). This measures how far from that a
trained VAE is, on the training images of a config, in the UNet's (scaled) latent units:

    python train_vae.py --config configs/tiny.yaml --output_dir runs/flip --train.max_steps=400
    python benchmarks/latent_flip.py --vae runs/flip/vae/model --config configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import math

import torch

from ldm.config import load_config
from ldm.data import build_dataloader, build_datasets
from ldm.pipelines import latents


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="trained AutoencoderKL folder")
    p.add_argument("--config", required=True, help="config whose data to encode")
    p.add_argument("--num_images", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    cfg = load_config(args.config, {"data.random_flip": False})
    train, _, _ = build_datasets(cfg.data)
    x = next(iter(build_dataloader(train, args.num_images, shuffle=False, drop_last=False)))["pixel_values"]
    with torch.no_grad():
        mean, logvar = latents.posterior_moments(vae, x)
        mean_of_flipped, _ = latents.posterior_moments(vae, x.flip(-1))
        from_flipped_latents = vae.decode(mean.flip(-1)).sample
        from_flipped_images = vae.decode(mean_of_flipped).sample
    s = vae.config.scaling_factor
    diff = (mean.flip(-1) - mean_of_flipped) * s
    std = (torch.exp(0.5 * logvar) * s).mean()
    psnr = lambda y: 10 * math.log10(4 / (y - x.flip(-1)).pow(2).mean().item())  # images in [-1, 1]: peak-to-peak 2
    print(f"{len(x)} images, latents {tuple(mean.shape[1:])}, scaling_factor {s:.4f}")
    print(f"||flip(mu(x)) - mu(flip(x))|| / ||mu(x)||          = {diff.norm() / (mean * s).norm():.3f}")
    print(f"RMS(flip(mu(x)) - mu(flip(x))) / mean posterior std = {diff.pow(2).mean().sqrt() / std:.2f}")
    print(f"PSNR against flip(x): D(mu(flip(x))) {psnr(from_flipped_images):.2f} dB, "
          f"D(flip(mu(x))) {psnr(from_flipped_latents):.2f} dB")


if __name__ == "__main__":
    main()
