"""Why an L1 autoencoder draws colourful objects on white in gray: train the autoencoder alone under one variant of
the recipe and print its held-out colour scores (ldm.eval.colour) every --every steps, one JSON line each.

The measurements of docs/colour.md come from this script on the coloured shapes of benchmarks/colour_sets.py:

    python benchmarks/colour_sets.py --out runs/data16 --sets shapes --size 32 --per_class 100
    python benchmarks/colour_cause.py --data runs/data16/shapes --res 16 --channels 32,32 --batch 8 --steps 1000 \
        --name l1                                   # today's loss: L1 pixels only
    ... --name l2 --rec l2                          # squared pixel error instead
    ... --name chroma1 --chroma_weight 1            # L1 + squared chroma error (the recipe now: weight 1)
    ... --groups 1 | --posterior_mean | --lr 3e-3 | --latent 8 | --precondition 4   (the other candidates)

It uses the project's own data pipeline, AutoencoderKL builder and loss, without the training spine (no
checkpoints, EMA or logs), so one variant at 16 px runs in 1-2 minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler

from ldm.config.schema import DataConfig, VAELossConfig, VAEModelConfig
from ldm.data import build_dataloader, build_datasets
from ldm.eval import metrics as M
from ldm.eval.colour import ColourAccumulator
from ldm.eval.evaluation import reconstruction_batches
from ldm.losses import vae_loss
from ldm.models import build_vae


def colour_preconditioner(vae, k: float) -> None:
    """Scale the two chroma axes by k where the image enters the encoder and where the decoder's output leaves
    (a reparametrisation: the function class is the same, only the optimiser's view of colour changes)."""
    basis = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]])
    basis = basis / basis.norm(dim=1, keepdim=True)
    m = basis.T @ torch.diag(torch.tensor([1.0, k, k])) @ basis
    vae.encoder.conv_in.register_forward_pre_hook(lambda _, inp: (torch.einsum("ij,njhw->nihw", m, inp[0]),))
    vae.decoder.conv_out.register_forward_hook(lambda _, inp, out: torch.einsum("ij,njhw->nihw", m, out))


@torch.no_grad()
def evaluate(vae, holdout) -> dict:
    vae.eval()
    colour, psnr = ColourAccumulator(), []
    for images, recon in reconstruction_batches(vae, holdout):
        colour.add(images, recon)
        psnr.append(M.psnr(recon, images))
    vae.train()
    return {**colour.result(), "psnr": torch.cat(psnr).mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder of RGB images")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--channels", default="32,64,64", help="vae block_out_channels")
    p.add_argument("--latent", type=int, default=4, help="latent channels")
    p.add_argument("--groups", type=int, default=32, help="GroupNorm groups")
    p.add_argument("--rec", default="l1", choices=("l1", "l2"))
    p.add_argument("--chroma_weight", type=float, default=0.0)
    p.add_argument("--posterior_mean", action="store_true", help="decode the posterior mean in training, no noise")
    p.add_argument("--precondition", type=float, default=0.0, help="chroma scale k of colour_preconditioner")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="run")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    train, holdout, _ = build_datasets(DataConfig(source="folder", path=a.data, resolution=a.res, color_mode="rgb",
                                                  random_flip=True, holdout_fraction=0.1))
    vae = build_vae(VAEModelConfig(block_out_channels=[int(c) for c in a.channels.split(",")], layers_per_block=1,
                                   latent_channels=a.latent, norm_num_groups=a.groups), 3, a.res)
    if a.precondition:
        colour_preconditioner(vae, a.precondition)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=a.warmup, num_training_steps=a.steps)
    loss_cfg = VAELossConfig(reconstruction=a.rec, chroma_weight=a.chroma_weight)
    step, epoch, start = 0, 0, time.time()
    while step < a.steps:
        train.set_epoch(epoch)
        for batch in build_dataloader(train, a.batch, shuffle=True, num_workers=0, seed=a.seed + epoch):
            images = batch["pixel_values"]
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.mode() if a.posterior_mean else posterior.sample()).sample
            loss, _ = vae_loss(loss_cfg, images, recon, DiagonalGaussianDistribution(posterior.parameters.float()), step)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % a.every == 0 or step == a.steps:
                print(json.dumps({"name": a.name, "seed": a.seed, "step": step, "seconds": round(time.time() - start),
                                  **evaluate(vae, holdout)}), flush=True)
            if step >= a.steps:
                break
        epoch += 1


if __name__ == "__main__":
    main()
