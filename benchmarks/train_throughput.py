"""Training throughput of the UNet stage three ways, in one run, printed side by side.

  (a) latent UNet, latents sampled from the latent cache (posterior mean/logvar on disk; the encoder never runs);
  (b) the same latent UNet, encoding every batch with the VAE on the fly (what training did before the cache);
  (c) pixel-space diffusion as diffusers' examples/unconditional_image_generation/train_unconditional.py does it:
      a UNet2DModel on the pixels with DDPMScheduler noise and an MSE loss. "Comparable model": the same UNet
      config as (a) (widths, levels, attention, layers per block), with image channels in and out, at the image
      resolution; the example's own default UNet (128-512 channels, 6 levels) would be far larger.

A step is the whole training step (data loader, latents, noise, forward, backward, AdamW). Each mode first builds its
UNet and optimizer and runs its warm-up steps alone, which is when its peak memory is measured, above the level just
before it built anything: CUDA max_memory_allocated on a GPU; on the CPU the process RSS sampled every 5 ms by a
background thread (psutil, or /proc/self/statm without it), after malloc_trim so freed memory is back with the OS.
Then the modes take one timed step each in turn (round robin) for --seconds in total, so that on a shared machine
all three see the same background load and their ratios stay meaningful even when absolute speeds do not.

    python benchmarks/train_throughput.py                          # configs/digits.yaml, 2 threads, ~90 s on CPU
    python benchmarks/train_throughput.py --vae runs/digits/vae/model --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs/digits.yaml"), help="sizes of data, VAE and UNet")
    p.add_argument("--vae", help="a trained AutoencoderKL folder (default: untrained, same speed)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--batch_size", type=int, default=None, help="default: denoiser.train.batch_size of the config")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--seconds", type=float, default=60.0, help="timed wall time, all modes together")
    return p.parse_args()


class PeakMemory:
    """Peak memory above the level at start(): CUDA allocator stats, or sampled RSS on the CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        try:
            import psutil

            process = psutil.Process()
            self.rss, self.how = (lambda: process.memory_info().rss), "RSS sampled every 5 ms (psutil)"
        except ImportError:
            page = os.sysconf("SC_PAGE_SIZE")
            self.rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * page
            self.how = "RSS sampled every 5 ms (/proc/self/statm)"
        if device.type == "cuda":
            self.how = "torch.cuda.max_memory_allocated"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
            return
        _malloc_trim()
        self.base = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def stop(self) -> float:
        """MiB above the starting level."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            return (self.torch.cuda.max_memory_allocated() - self.base) / 2**20
        self.running = False
        self.thread.join()
        return (self.peak - self.base) / 2**20


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def batches(dataset, batch_size: int, device, collate_fn):
    """Endless device batches, re-shuffled every epoch, like the training spine's loader."""
    import torch

    epoch = 0
    while True:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                             collate_fn=collate_fn, generator=torch.Generator().manual_seed(epoch))
        for batch in loader:
            yield {k: v.to(device) for k, v in batch.items()}
        epoch += 1


class Mode:
    """One way of training: a UNet, its optimizer and data, and how a batch becomes the diffusion's x0."""

    def __init__(self, make_unet, get_x0, data, scheduler, device):
        import torch

        torch.manual_seed(0)
        self.unet = make_unet().to(device).train()
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4)
        self.get_x0, self.data, self.scheduler, self.device = get_x0, data, scheduler, device
        self.params = sum(p.numel() for p in self.unet.parameters()) / 1e6
        self.seconds, self.images, self.steps = 0.0, 0, 0

    def step(self, timed: bool) -> None:
        import torch
        import torch.nn.functional as F

        start = time.perf_counter()
        batch = next(self.data)
        with torch.no_grad():
            x0 = self.get_x0(batch).float()
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=self.device)
        loss = F.mse_loss(self.unet(self.scheduler.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the GPU
        self.shape = tuple(x0.shape[1:])
        if timed:
            self.seconds += time.perf_counter() - start
            self.images += x0.shape[0]
            self.steps += 1


def print_table(modes: dict, peaks: dict, header: str, memory_how: str) -> None:
    pixel_speed, pixel_peak = modes[PIXEL].images / modes[PIXEL].seconds, peaks[PIXEL]
    print(f"\n{header}\npeak memory: {memory_how}, above the level before the mode built its model\n")
    print(f"| {'mode':<44} | {'UNet input':<10} | {'params':>7} | {'steps':>5} | {'images/s':>8} | "
          f"{'speed vs (c)':>12} | {'peak MiB':>8} | {'mem vs (c)':>10} |")
    print(f"|{'-' * 46}|{'-' * 12}|{'-' * 9}|{'-' * 7}|{'-' * 10}|{'-' * 14}|{'-' * 10}|{'-' * 12}|")
    for name, m in modes.items():
        speed = m.images / m.seconds
        mem_ratio = f"{peaks[name] / pixel_peak:.2f}x" if pixel_peak > 0 else "n/a"
        print(f"| {name:<44} | {'x'.join(map(str, m.shape)):<10} | {m.params:>6.2f}M | {m.steps:>5} | "
              f"{speed:>8.1f} | {speed / pixel_speed:>11.2f}x | {peaks[name]:>8.1f} | {mem_ratio:>10} |")
    a, b = (m.images / m.seconds for m in list(modes.values())[:2])
    print(f"\n(a)/(b) = {a / b:.2f}x: what the cache saves per step. (a)/(c) = {a / pixel_speed:.2f}x.")


CACHED, ON_THE_FLY = "(a) latent UNet, latents from the cache", "(b) latent UNet, VAE encode every step"
PIXEL = "(c) pixel UNet2DModel (train_unconditional)"


def main() -> int:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL, UNet2DModel

    from ldm.config import load_config
    from ldm.data import build_datasets, collate
    from ldm.models import build_noise_scheduler, build_unet, build_vae
    from ldm.pipelines import latents
    from ldm.train import latent_cache

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = load_config(args.config)
    batch_size = args.batch_size or cfg.denoiser.train.batch_size
    train, _, info = build_datasets(cfg.data)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(args.vae) if args.vae else build_vae(cfg.vae.model, info.num_channels,
                                                                             info.resolution)
    vae.requires_grad_(False).eval().to(device)
    scheduler = build_noise_scheduler(cfg.denoiser.diffusion)
    memory = PeakMemory(device)

    tmp = tempfile.TemporaryDirectory(prefix="ldm-bench-cache-")
    t0 = time.perf_counter()
    latent_cache.build(vae, cfg.data, Path(tmp.name) / "cache", batch_size=batch_size, device=device)
    build_s = time.perf_counter() - t0
    cache = latent_cache.load(Path(tmp.name) / "cache")

    latent_cfg = build_unet(cfg.denoiser.model, vae).config
    c, r = info.num_channels, info.resolution
    specs = {  # name: (UNet factory, batch -> x0, data set, collate)
        CACHED: (lambda: UNet2DModel.from_config(latent_cfg), lambda b: latent_cache.sample_latents(vae, b),
                 cache, latent_cache.collate),
        ON_THE_FLY: (lambda: UNet2DModel.from_config(latent_cfg), lambda b: latents.encode(vae, b["pixel_values"]),
                     train, collate),
        PIXEL: (lambda: UNet2DModel.from_config({**latent_cfg, "in_channels": c, "out_channels": c, "sample_size": r}),
                lambda b: b["pixel_values"], train, collate),
    }
    modes, peaks = {}, {}
    for name, (make_unet, get_x0, dataset, collate_fn) in specs.items():  # 1. build + warm up alone: peak memory
        memory.start()
        modes[name] = Mode(make_unet, get_x0, batches(dataset, batch_size, device, collate_fn), scheduler, device)
        for _ in range(max(1, args.warmup)):
            modes[name].step(timed=False)
        peaks[name] = memory.stop()
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds or min(m.steps for m in modes.values()) < 3:  # 2. round robin
        for mode in modes.values():
            mode.step(timed=True)
    for name, m in modes.items():
        print(f"  {name}: {m.images / m.seconds:.1f} images/s", file=sys.stderr, flush=True)

    where = f"{device.type} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads"
    print_table(modes, peaks, f"UNet training throughput, {Path(args.config).name}: batch {batch_size}, device "
                f"{where}, {args.warmup} warm-up steps per mode, then {args.seconds:.0f} s round robin", memory.how)
    print(f"cache build (one-off, eval mode, batched, no grad): {len(cache)} images in {build_s:.1f} s "
          f"({len(cache) / build_s:.0f} images/s)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
