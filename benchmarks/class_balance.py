"""Where do an unconditional model's classes go? Per-class shares at every stage of a trained run.

For a run trained on labelled data, the classifier of `ldm train-classifier` assigns a class to
  labels      the real training images' own labels (the data's balance)
  real        the real training images (what the classifier makes of real data: its confusions)
  recon       the autoencoder's reconstructions of those images (what the first stage keeps)
  <sampler>   samples of the pipeline (EMA weights) with each sampler of --samplers
  raw         samples of the last checkpoint's raw (non-EMA) UNet weights, first sampler
and the table gives each class's share in each column, plus the share of each class's real images whose
reconstruction the classifier still puts in that class (recon acc). A class that vanishes in `recon` is lost by the
autoencoder; one that vanishes only in the sample columns, by the diffusion model or its sampler; one that is
rare in `real` already, by the classifier.

    python benchmarks/class_balance.py --run runs/photos --data runs/data/photos --features runs/clf/photos
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def shares(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(labels, minlength=num_classes).double() / len(labels)


def predicted(network, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    from ldm.eval.evaluation import extract_images

    return extract_images(network, images, batch_size, "cpu")["logits"].argmax(dim=1)


@torch.no_grad()
def real_and_reconstructed(vae, dataset, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ldm.data import build_dataloader

    images, recons, labels = [], [], []
    for batch in build_dataloader(dataset, batch_size, shuffle=False, drop_last=False):
        x = batch["pixel_values"]
        images.append(x)
        recons.append(vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1))
        labels.append(batch["label"])
    return torch.cat(images), torch.cat(recons), torch.cat(labels)


def sample_classes(pipe, network, sampler: str, num_samples: int, seed: int) -> torch.Tensor:
    from ldm.eval.evaluation import generate
    from ldm.schedulers import make_scheduler

    name, steps = sampler.split(":")
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    images, _ = generate(pipe, list(range(num_samples)), seed, int(steps), batch_size=100)
    return predicted(network, images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder with pipeline/ and unet/checkpoints/")
    p.add_argument("--data", required=True, help="config or image folder the run was trained on")
    p.add_argument("--features", required=True, help="classifier folder (ldm train-classifier)")
    p.add_argument("--samplers", default="ddim:50,ddpm:100", help="comma-separated name:steps")
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--max_real", type=int, default=2000, help="real images classified (a seeded subset)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    from ldm.eval.evaluation import load_data
    from ldm.eval.features import ClassifierFeatures
    from ldm.pipelines import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(args.run + "/pipeline")
    pipe.set_progress_bar_config(disable=True)
    network = ClassifierFeatures(args.features)
    train, _, info = load_data(args.data, pipe.vae.config.in_channels, pipe.vae.config.sample_size)
    subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.max_real]
    real, recon, labels = real_and_reconstructed(pipe.vae, train.select(sorted(subset.tolist())))
    n = network.num_classes
    real_pred, recon_pred = predicted(network, real), predicted(network, recon)
    columns = {"labels": shares(labels, n), "real": shares(real_pred, n), "recon": shares(recon_pred, n)}
    recon_acc = torch.tensor([(recon_pred[labels == c] == c).double().mean().item() for c in range(n)])
    real_acc = torch.tensor([(real_pred[labels == c] == c).double().mean().item() for c in range(n)])
    samplers = args.samplers.split(",")
    for sampler in samplers:
        columns[sampler] = shares(sample_classes(pipe, network, sampler, args.num_samples, args.seed), n)
    checkpoints = sorted(Path(args.run, "unet", "checkpoints").glob("checkpoint-*"),
                         key=lambda c: int(c.name.split("-")[1]))
    if checkpoints:
        pipe.unet.load_state_dict(load_file(checkpoints[-1] / "model.safetensors"))
        columns[f"raw {samplers[0]}"] = shares(sample_classes(pipe, network, samplers[0], args.num_samples,
                                                             args.seed), n)
    names = info.class_names or [str(c) for c in range(n)]
    print("| class | " + " | ".join(columns) + " | real acc | recon acc |")
    print("|---" * (len(columns) + 3) + "|")
    for c in range(n):
        cells = " | ".join(f"{100 * col[c]:.1f}" for col in columns.values())
        print(f"| {names[c]} | {cells} | {100 * real_acc[c]:.0f} | {100 * recon_acc[c]:.0f} |")
    print("| KL to real, nats | " + " | ".join(f"{kl(col, columns['real']):.3f}" for col in columns.values())
          + " | | |")


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) over classes, with q floored so that an empty class gives a finite number."""
    q = q.clamp_min(1e-4)
    return float((p[p > 0] * (p[p > 0] / q[p > 0]).log()).sum())


if __name__ == "__main__":
    main()
