"""Compare autoencoder recipes on one data set: held-out PSNR, SSIM, classifier-rFID and recall, and the cost of a step.

Each candidate is a set of config overrides on top of a base config; every one trains with `train_vae.py` for the
same number of steps (or minutes) and is scored by the run's own held-out evaluation (`vae/metrics.json`). The cost
of a step is given twice: counted (GFLOPs of one forward + backward, torch's FlopCounterMode; independent of machine
load) and measured (seconds per step of the whole run, which a shared machine makes noisy). Results are appended to
OUT/results.jsonl (a candidate already there is skipped, so an interrupted comparison continues), and the table of
all results in that file is printed in Markdown:

    python benchmarks/texture_sets.py --out runs/data
    ldm train-classifier --data runs/data/photos --out runs/clf/photos --color_mode rgb
    python benchmarks/vae_recipes.py --data runs/data/photos --classifier runs/clf/photos --out runs/recipes/photos \
        --candidates base,c8,c8_spectral --steps 400 --threads 1

`--data digits` uses the embedded digits (and a classifier trained with `--data configs/digits.yaml`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Overrides of the vae section of the base config (keys relative to `vae.`).
CANDIDATES: dict[str, dict] = {
    "base": {},
    "c8": {"model.latent_channels": 8},
    "c16": {"model.latent_channels": 16},
    "ssim": {"loss.ssim_weight": 1.0},
    "spectral": {"loss.spectral_weight": 1.0},
    "gan": {"loss.disc_weight": 0.5, "loss.disc_start": 0.5},
    "c8_ssim": {"model.latent_channels": 8, "loss.ssim_weight": 1.0},
    "c8_spectral": {"model.latent_channels": 8, "loss.spectral_weight": 1.0},
    "c8_gan": {"model.latent_channels": 8, "loss.disc_weight": 0.5, "loss.disc_start": 0.5},
    "c8_spectral_gan": {"model.latent_channels": 8, "loss.spectral_weight": 1.0, "loss.disc_weight": 0.5,
                        "loss.disc_start": 0.5},
    "c8_kl1e-5": {"model.latent_channels": 8, "loss.kl_weight": 1e-5},
    "c8_lpb2": {"model.latent_channels": 8, "model.layers_per_block": 2},
    "c8_wide": {"model.latent_channels": 8, "model.block_out_channels": [64, 128, 128]},
    "c8_narrow": {"model.latent_channels": 8, "model.block_out_channels": [32, 32, 64]},
    "f2_c4": {"model.block_out_channels": [32, 64]},
    "f2_c4_lr2e-3": {"model.block_out_channels": [32, 64], "train.learning_rate": 2e-3},
    "f2_c8_lr2e-3": {"model.block_out_channels": [32, 64], "model.latent_channels": 8, "train.learning_rate": 2e-3},
    "lr2e-3": {"train.learning_rate": 2e-3},
    "lr2e-3_c8": {"train.learning_rate": 2e-3, "model.latent_channels": 8},
    "lr2e-3_spectral": {"train.learning_rate": 2e-3, "loss.spectral_weight": 1.0},
    "lr2e-3_gan": {"train.learning_rate": 2e-3, "loss.disc_weight": 0.5, "loss.disc_start": 0.5},
    "bf16": {"train.mixed_precision": "bf16"},
    "gan_0.6": {"loss.disc_weight": 0.5, "loss.disc_start": 0.6},
    "b16_x2": {"train.batch_size": 16, "train.steps_factor": 2},
    # Same compute as 400 steps of batch 32: twice the steps of half the batch.
    "c16_b16": {"model.latent_channels": 16, "train.batch_size": 16, "train.steps_factor": 2},
    "c16_b16_lr2e-3": {"model.latent_channels": 16, "train.batch_size": 16, "train.steps_factor": 2,
                       "train.learning_rate": 2e-3},
    "c16_spectral": {"model.latent_channels": 16, "loss.spectral_weight": 1.0},
    "c16_gan": {"model.latent_channels": 16, "loss.disc_weight": 0.5, "loss.disc_start": 0.5},
}


def data_overrides(data: str, color_mode: str) -> list[str]:
    if data == "digits":
        return []
    return ["--data.source=folder", f"--data.path={data}", f"--data.color_mode={color_mode}"]


def step_gflops(config: str, overrides: list[str]) -> float:
    """GFLOPs of one autoencoder training step (forward + backward of the reconstruction; the discriminator and
    loss terms on top are small at these sizes), counted by torch.utils.flop_counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.config import config_from_argv
    from ldm.models import build_vae

    cfg, _ = config_from_argv(["--config", config, *overrides], stage="vae")
    channels = 3 if cfg.data.color_mode == "rgb" else 1
    vae = build_vae(cfg.vae.model, channels, cfg.data.resolution)
    x = torch.zeros(cfg.vae.train.batch_size, channels, cfg.data.resolution, cfg.data.resolution)
    with FlopCounterMode(display=False) as counter:
        vae(x, sample_posterior=True).sample.abs().mean().backward()
    return counter.get_total_flops() / 1e9


def run_candidate(name: str, args, out: Path) -> dict:
    candidate = dict(CANDIDATES[name])
    factor = candidate.pop("train.steps_factor", 1)  # steps relative to --steps (a smaller batch takes more)
    candidate.setdefault("train.max_steps", round(args.steps * factor))
    overrides = data_overrides(args.data, args.color_mode) + [f"--vae.{k}={json.dumps(v)}"
                                                              for k, v in candidate.items()]
    budget = [f"--train.max_minutes={args.minutes}"] if args.minutes else []
    command = [sys.executable, str(REPO / "train_vae.py"), "--config", args.config, "--output_dir", str(out / name),
               "--vae.eval_features", args.classifier, "--train.checkpointing_steps=0", "--train.sample_every=0",
               "--train.report_to=none", f"--train.num_threads={args.threads}", *budget, *overrides]
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "n/a"
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    metrics = json.loads((out / name / "vae" / "metrics.json").read_text())
    steps = candidate["train.max_steps"]
    checkpoints = sorted((out / name / "vae" / "checkpoints").glob("checkpoint-*/budget.json"))
    if checkpoints:  # a time budget: the planned step count
        steps = json.loads(checkpoints[-1].read_text())["planned_steps"] or steps
    return {"candidate": name, "overrides": CANDIDATES[name], "steps": steps, "seconds": round(seconds, 1),
            "load_at_start": load, "gflops_per_step": round(step_gflops(args.config, overrides), 2),
            "threads": args.threads, **{k: v for k, v in metrics.items() if k.startswith("holdout_")}}


def table(results: list[dict]) -> str:
    rows = ["| candidate | steps | GFLOP/step | s (load) | PSNR | SSIM | rFID | recall |", "|---" * 8 + "|"]
    for r in results:
        rows.append(f"| {r['candidate']} | {r['steps']} | {r['gflops_per_step']} | {r['seconds']:.0f} "
                    f"({r['load_at_start']}) | {r['holdout_psnr']:.2f} | {r['holdout_ssim']:.3f} | "
                    f"{r.get('holdout_classifier-rFID', float('nan')):.2f} | "
                    f"{r.get('holdout_classifier-recall', float('nan')):.3f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder (class sub-folders), or 'digits'")
    p.add_argument("--color_mode", default="rgb", choices=("rgb", "grayscale"))
    p.add_argument("--classifier", required=True, help="classifier folder for rFID (ldm train-classifier)")
    p.add_argument("--config", default=str(REPO / "configs/digits.yaml"), help="base config")
    p.add_argument("--candidates", default="base", help=f"comma-separated, from {','.join(CANDIDATES)}")
    p.add_argument("--steps", type=int, default=400, help="training steps of every candidate")
    p.add_argument("--minutes", type=float, help="train.max_minutes of every candidate instead of --steps")
    p.add_argument("--threads", type=int, default=1, help="train.num_threads")
    p.add_argument("--out", required=True, help="folder for the runs and results.jsonl")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    done = {json.loads(line)["candidate"] for line in log.read_text().splitlines()} if log.exists() else set()
    for name in args.candidates.split(","):
        if name not in CANDIDATES:
            raise SystemExit(f"--candidates: unknown {name!r}; choose from {', '.join(CANDIDATES)}")
        if name in done:
            continue
        result = run_candidate(name, args, out)
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(table([result]).splitlines()[-1], flush=True)
    print(table([json.loads(line) for line in log.read_text().splitlines()]))


if __name__ == "__main__":
    main()
