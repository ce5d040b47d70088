"""The autoencoder's floor under a sample score, measured exactly as `ldm eval` measures samples.

`train_vae.py` scores held-out reconstructions against their own originals (a few hundred images on each side). A
sample FID compares 1,000 samples with every training image. To ask "could the decoder alone explain the sample
score?", this script scores autoencoder reconstructions the way samples are scored: the same reference features (the
training images of `--data`, from the same cache `ldm eval` uses), the same metrics, the same number of images:

    python benchmarks/decoder_floor.py --model runs/t32_photos/pipeline --data runs/data/photos \
        --features runs/clf/photos --config runs/t32_photos/vae/config.yaml --num_images 1000

Two sets of inputs are reconstructed: `num_images` of the run's training images and all of its held-out images
(the split of the run's own config, `--config`); also printed is the score of the originals themselves (the FID a
perfect autoencoder would get, the sampling floor of the metric).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch


def main() -> None:
    from ldm.config import load_config
    from ldm.data import build_datasets
    from ldm.eval.evaluation import extract_images, load_data, reconstruction_batches, sample_metrics
    from ldm.eval.features import cached_real_features, default_cache_dir, load_feature_network
    from ldm.pipelines import LatentDiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline folder (its VAE is scored)")
    p.add_argument("--data", required=True, help="as `ldm eval --data`: the reference images")
    p.add_argument("--features", required=True, help="classifier folder, as `ldm eval --features`")
    p.add_argument("--config", required=True, help="the VAE run's config.yaml: its training / held-out split")
    p.add_argument("--num_images", type=int, default=1000)
    p.add_argument("--out", default=None, help="also write the result as JSON")
    args = p.parse_args()
    torch.manual_seed(0)

    vae = LatentDiffusionPipeline.from_pretrained(args.model).vae.eval()
    channels, size = vae.config.in_channels, vae.config.sample_size
    network = load_feature_network(args.features)
    reference, _, info = load_data(args.data, channels, size)
    real = cached_real_features(network, reference, info.fingerprint, "train", default_cache_dir())

    run_data = dataclasses.replace(load_config(args.config).data, crop="center", random_flip=False)
    run_train, run_holdout, _ = build_datasets(run_data)
    picks = torch.randperm(len(run_train), generator=torch.Generator().manual_seed(0))[: args.num_images].tolist()
    result = {"model": args.model, "num_reference": len(real["features"]), "feature_network": network.name}
    for name, dataset in (("train", run_train.select(picks)), ("holdout", run_holdout)):
        pairs = list(reconstruction_batches(vae, dataset))
        originals, reconstructions = (torch.cat([pair[k] for pair in pairs]) for k in (0, 1))
        for kind, images in (("originals", originals), ("reconstructions", reconstructions)):
            fake = extract_images(network, images, 256, "cpu")
            scores = sample_metrics(network, real, fake, ("fid", "pr"))
            key = f"{name}_{kind}"
            result[key] = {"num_images": len(images), **{k: scores[k] for k in scores if not isinstance(scores[k], list)}}
            fid = scores[f"{network.metric_prefix}FID"]
            print(f"{key:24s} {len(images):5d} images  FID {fid:7.3f}  "
                  f"precision {scores[f'{network.metric_prefix}precision']:.3f}  "
                  f"recall {scores[f'{network.metric_prefix}recall']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
