"""Training throughput and peak memory of the two denoisers at matched parameter counts, printed side by side.

  unet  the config's UNet2DModel (denoiser.model.block_out_channels, attention, layers_per_block, ...)
  dit   a DiTTransformer2DModel with the config's patch_size, num_layers and num_attention_heads, and the width
        (a multiple of the heads and of 4) whose parameter count comes closest to the UNet's

Both train on the same latents (unit Gaussian, of the config's latent shape: the autoencoder and the data loader cost
the same whichever denoiser follows, so they are left out) with the DDPM noise-prediction loss and AdamW. Peak
memory and the round-robin timing are train_throughput.py's: each model's warm-up steps alone (peak above the level
before it was built: CUDA max_memory_allocated, or the sampled RSS on the CPU), then one timed step each in turn for
--seconds, so that both see the same background load on a shared machine.

    python benchmarks/backbone_throughput.py                        # configs/digits.yaml: 8x8x4 latents, CPU
    python benchmarks/backbone_throughput.py --config configs/celebahq256.yaml --device cuda --patch_size 2
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import PeakMemory  # a sibling script

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs/digits.yaml"), help="the UNet, latent shape and batch")
    p.add_argument("--patch_size", type=int, default=None, help="the DiT's (default: denoiser.model.patch_size)")
    p.add_argument("--num_layers", type=int, default=None, help="the DiT's depth (default: the config's)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--batch_size", type=int, default=None, help="default: denoiser.train.batch_size of the config")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--seconds", type=float, default=60.0, help="timed wall time, both models together")
    return p.parse_args()


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_dit(model_cfg, channels: int, size: int, target: int):
    """(DiT, its config): the width, a multiple of the heads and of 4 (the position embedding's quarters), whose
    parameter count is closest to `target` (the count grows with the width, so a bisection finds it)."""
    from ldm.dit import build_dit

    step = math.lcm(model_cfg.num_attention_heads, 4)

    def build(multiple: int):
        cfg = dataclasses.replace(model_cfg, width=multiple * step)
        return build_dit(cfg, channels, size), cfg

    low, high = 1, 1
    while parameters(build(high)[0]) < target:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if parameters(build(middle)[0]) < target else (low, middle)
    candidates = [build(m) for m in (low, high)]
    return min(candidates, key=lambda c: abs(parameters(c[0]) - target))


class Backbone:
    """One denoiser with its optimizer: a training step on fresh latents, timed when asked."""

    def __init__(self, model, transformer: bool, shape, batch_size: int, scheduler, device):
        import torch

        self.model = model.to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.transformer, self.shape, self.batch_size = transformer, shape, batch_size
        self.scheduler, self.device = scheduler, device
        self.params = parameters(model) / 1e6
        self.seconds, self.images, self.steps = 0.0, 0, 0

    def step(self, timed: bool) -> None:
        import torch
        import torch.nn.functional as F

        from ldm.pipelines.pipeline_common import denoiser_output

        start = time.perf_counter()
        x0 = torch.randn(self.batch_size, *self.shape, device=self.device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.batch_size,), device=self.device)
        pred = denoiser_output(self.model, self.scheduler.add_noise(x0, noise, t), t, transformer=self.transformer)
        loss = F.mse_loss(pred, noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the GPU
        if timed:
            self.seconds += time.perf_counter() - start
            self.images += self.batch_size
            self.steps += 1


def main() -> int:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from ldm.config import load_config
    from ldm.models import build_noise_scheduler, build_unet, build_vae, latent_shape

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = load_config(args.config)
    batch_size = args.batch_size or cfg.denoiser.train.batch_size
    torch.manual_seed(0)
    # An untrained autoencoder of the config's shape: only its latent shape is used.
    vae = build_vae(cfg.vae.model, 1 if cfg.data.color_mode == "grayscale" else 3, cfg.data.resolution)
    channels, size = latent_shape(vae)
    m = cfg.denoiser.model
    unet = build_unet(dataclasses.replace(m, type="unet"), vae)
    dit_base = dataclasses.replace(m, type="dit", patch_size=args.patch_size or m.patch_size,
                                   num_layers=args.num_layers or m.num_layers)
    dit, dit_cfg = matched_dit(dit_base, channels, size, parameters(unet))
    scheduler = build_noise_scheduler(cfg.denoiser.diffusion)
    memory = PeakMemory(device)

    names = {"unet": f"UNet2DModel {list(m.block_out_channels)}, attention {list(m.attention)}",
             "dit": (f"DiT/{dit_cfg.patch_size}: {dit_cfg.num_layers} layers, width {dit_cfg.width}, "
                     f"{dit_cfg.num_attention_heads} heads, {(size // dit_cfg.patch_size) ** 2} tokens")}
    backbones, peaks = {}, {}
    for key, model in (("unet", unet), ("dit", dit)):
        memory.start()
        backbones[key] = Backbone(model, key == "dit", (channels, size, size), batch_size, scheduler, device)
        for _ in range(args.warmup):
            backbones[key].step(timed=False)
        peaks[key] = memory.stop()
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        for backbone in backbones.values():
            backbone.step(timed=True)

    print(f"\n{args.config}: latents {channels}x{size}x{size}, batch {batch_size}, {device}, {args.threads} threads; "
          f"peak memory: {memory.how}, above the level before the model was built\n")
    print(f"| {'backbone':<58} | {'params':>7} | {'steps':>5} | {'images/s':>8} | {'peak MiB':>8} |")
    print(f"|{'-' * 60}|{'-' * 9}|{'-' * 7}|{'-' * 10}|{'-' * 10}|")
    speeds = {}
    for key, b in backbones.items():
        speeds[key] = b.images / b.seconds
        print(f"| {names[key]:<58} | {b.params:>6.2f}M | {b.steps:>5} | {speeds[key]:>8.1f} | {peaks[key]:>8.1f} |")
    memory_ratio = f"{peaks['dit'] / peaks['unet']:.2f}x" if peaks["unet"] > 0 else "n/a"
    print(f"\nDiT / UNet: parameters {backbones['dit'].params / backbones['unet'].params:.2f}x, speed "
          f"{speeds['dit'] / speeds['unet']:.2f}x, peak memory {memory_ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
