"""One process of a two-"node" run, launched by tests/test_multinode.py (not a test module itself):

    accelerate launch --num_machines 2 --machine_rank R ... tests/multinode_worker.py PREFIX SHARED_DIR NODE_DIR
        [overrides]

Trains the UNet stage of configs/tiny.yaml (its latent cache under NODE_DIR: each node has its own, as on nodes
without a shared file system), then builds a second latent cache and real-data features in SHARED_DIR (one file
system for both nodes) and features in NODE_DIR, and writes PREFIX-rank<i>.pt: the trained weights, which caches
this process built or wrote, and the features it got.
"""

import sys
from pathlib import Path

import torch
from distributed_worker import record, seen
from torch import nn

from ldm.config import load_config, parse_overrides
from ldm.data import build_datasets
from ldm.eval import features
from ldm.train import latent_cache
from ldm.train.devices import process_state
from ldm.train.unet import UNetTask, load_frozen_vae, train_unet

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
writes = {"latent_cache": [], "features": []}


class TinyFeatures(nn.Module):
    """A fixed random projection standing in for a feature network (features_and_logits, fingerprint)."""

    fingerprint = "tinyfeatures"

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16 * 16, 8)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def features_and_logits(self, images):
        f = self.proj(images.flatten(1))
        return f, f[:, :2]


def count_writes() -> None:
    build, save_file = latent_cache.build, features.save_file

    def counting_build(vae, data_cfg, path, *args, **kwargs):
        writes["latent_cache"].append(str(Path(path).parent))
        return build(vae, data_cfg, path, *args, **kwargs)

    def counting_save(tensors, path, *args, **kwargs):
        writes["features"].append(str(Path(path).parent))
        return save_file(tensors, path, *args, **kwargs)

    latent_cache.build, features.save_file = counting_build, counting_save


def main(prefix: str, shared: str, node: str, *overrides: str) -> None:
    cfg = load_config(REPO / "configs/tiny.yaml", parse_overrides(
        [*overrides, f"--denoiser.latent_cache_dir={node}/latents"], stage="unet"))
    count_writes()
    # Before training: accelerate's end_training() ends the process group.
    # A latent cache on the shared file system: one process in the whole run must write it.
    _, holdout, info = build_datasets(cfg.data)
    latent_cache.build_or_load(load_frozen_vae(Path(cfg.denoiser.vae_path)), cfg.data, info, Path(shared) / "latents",
                               batch_size=32, cpu=True)
    # Real-data features: on the shared file system, then on each node's own, where node 0 has them already (a
    # process that returned early with its cached copy would leave the others waiting).
    state = process_state()
    network = TinyFeatures()
    got = {"shared": features.cached_real_features(network, holdout, "fp", "holdout", Path(shared) / "features", 8)}
    if state.is_main_process:
        (Path(node) / "features").mkdir(parents=True, exist_ok=True)
        for f in (Path(shared) / "features").glob("real-*.safetensors"):
            (Path(node) / "features" / f.name).write_bytes(f.read_bytes())
    state.wait_for_everyone()
    got["node"] = features.cached_real_features(network, holdout, "fp", "holdout", Path(node) / "features", 8)

    record(UNetTask)
    train_unet(cfg)
    accelerator = seen["accelerator"]
    weights = {k: v.detach().cpu() for k, v in accelerator.unwrap_model(seen["modules"]["model"]).state_dict().items()}
    torch.save({"weights": weights, "writes": writes, "features": got, "process_index": accelerator.process_index,
                "num_processes": accelerator.num_processes, "local_index": accelerator.local_process_index},
               f"{prefix}-rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
