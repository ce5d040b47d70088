"""Seconds per training step of the two stages of a config, measured side by side on the same threads.

A time budget on a shared machine is not reproducible in minutes (the same run took 13 to 22 minutes at 1 thread
depending on what else ran), but the ratio of the two stages' step times is: both are measured here in one process,
in alternating rounds, so a busier machine slows both alike. docs/vae_recipes.md states budgets in "reference
seconds": steps x these seconds per step, so that recipes compared at one budget did the same work.

    python benchmarks/stage_step_times.py --config configs/digits.yaml --threads 1
    python benchmarks/stage_step_times.py --config configs/digits.yaml --channels 3 --vae.train.batch_size=16
    python benchmarks/stage_step_times.py --config configs/textures32.yaml --channels 3 --reference configs/digits.yaml

With `--reference`, that config's two stages are timed in the same rounds, and each stage of `--config` is also
given in reference seconds: its step time relative to the reference stages', times the reference stages' seconds on
a quiet machine (`--reference_seconds`, docs/vae_recipes.md), so recipes of different shapes are put on one budget.

Each step is one forward and backward pass with an AdamW update on random inputs of the stage's shapes (the VAE:
images; the UNet: latents of that VAE, as the latent cache feeds them), without the data loading, logging and
checkpointing of a real run.
"""

from __future__ import annotations

import argparse
import time

import torch


def vae_step(vae, optimizer, batch: torch.Tensor) -> None:
    posterior = vae.encode(batch).latent_dist
    rec = vae.decode(posterior.sample()).sample
    loss = (rec - batch).abs().mean() + 1e-6 * posterior.kl().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def unet_step(unet, optimizer, latents: torch.Tensor) -> None:
    t = torch.randint(0, 1000, (latents.shape[0],))
    noise = torch.randn_like(latents)
    loss = ((unet(latents + noise, t).sample - noise) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    from ldm.config import load_config, parse_overrides
    from ldm.models import build_unet, build_vae, latent_shape

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--channels", type=int, default=1, help="image channels (1 grayscale, 3 rgb)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps per stage and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reference", default=None, help="a second config timed alongside (its stages: ref_vae, ref_unet)")
    p.add_argument("--reference_seconds", default="1.40,0.75",
                   help="VAE,UNet seconds per step of --reference on a quiet machine (the budget's unit)")
    args, rest = p.parse_known_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def stages_of(cfg, prefix: str) -> dict:
        res = cfg.data.resolution
        vae = build_vae(cfg.vae.model, args.channels, res)
        unet = build_unet(cfg.denoiser.model, vae)
        channels, size = latent_shape(vae)
        return {
            f"{prefix}vae": (vae_step, vae, torch.randn(cfg.vae.train.batch_size, args.channels, res, res)),
            f"{prefix}unet": (unet_step, unet, torch.randn(cfg.denoiser.train.batch_size, channels, size, size)),
        }

    cfg = load_config(args.config, parse_overrides(rest))
    stages = stages_of(cfg, "")
    if args.reference:
        stages |= stages_of(load_config(args.reference), "ref_")
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, (_, model, _) in stages.items()}
    for name, (step, model, batch) in stages.items():  # untimed: allocation and first-call costs
        step(model, optimizers[name], batch)
    seconds = {name: 0.0 for name in stages}
    for _ in range(args.rounds):  # alternate, so that a change of load hits both stages
        for name, (step, model, batch) in stages.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(model, optimizers[name], batch)
            seconds[name] += time.perf_counter() - start
    per_step = {name: s / (args.rounds * args.steps) for name, s in seconds.items()}
    print(f"vae  batch {cfg.vae.train.batch_size:3d}: {per_step['vae']:.3f} s/step")
    print(f"unet batch {cfg.denoiser.train.batch_size:3d}: {per_step['unet']:.3f} s/step")
    print(f"ratio vae/unet: {per_step['vae'] / per_step['unet']:.2f} (threads {args.threads})")
    if args.reference:
        quiet = dict(zip(("ref_vae", "ref_unet"), (float(x) for x in args.reference_seconds.split(","))))
        # Each reference stage gives a machine-speed factor; their mean puts this run's seconds on the quiet scale.
        speed = sum(quiet[name] / per_step[name] for name in quiet) / len(quiet)
        for name in ("ref_vae", "ref_unet"):
            print(f"{name}: {per_step[name]:.3f} s/step")
        for name in ("vae", "unet"):
            print(f"{name}: {per_step[name] * speed:.3f} reference s/step")


if __name__ == "__main__":
    main()
