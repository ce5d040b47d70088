"""One rank of a 2-process run, launched by tests/test_distributed.py (not a test module itself):

    accelerate launch --multi_gpu --num_processes 2 ... tests/distributed_worker.py vae|unet OUT_FILE_PREFIX [overrides]

Trains one stage of configs/tiny.yaml through the real entry point (train_vae / train_unet) and then writes
<prefix>-rank<i>.pt: the trained weights this rank ended with, how many images it trained on, a fingerprint of its
first batch, its micro-batch losses and the (seed, epoch, example index) of each random crop/flip it drew, so the
test can check that the ranks agree on the weights but saw different data and augmentations, and that the logged
loss is their average.
"""

import sys
from pathlib import Path

import torch

from ldm.config import load_config, parse_overrides
from ldm.data import ImageTransform
from ldm.train.unet import UNetTask, train_unet
from ldm.train.vae import VAETask, train_vae

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
seen = {"images": 0, "first_batch": None, "losses": [], "augmentations": []}


def record(task_cls):
    """Wrap the task's attach/compute_loss to remember the prepared modules and count the images trained on."""
    attach, compute_loss = task_cls.attach, task_cls.compute_loss

    def recording_attach(self, accelerator, modules):
        seen.update(accelerator=accelerator, modules=modules)
        attach(self, accelerator, modules)

    def counting_compute_loss(self, batch, step):
        first = next(v for v in batch.values() if torch.is_tensor(v))  # pixels, or cached latent moments
        seen["images"] += first.shape[0]
        if seen["first_batch"] is None:
            seen["first_batch"] = first.double().sum().item()
        loss, logs = compute_loss(self, batch, step)
        seen["losses"].append((step, loss.item()))  # (optimizer steps done before, this micro-batch's loss)
        return loss, logs

    task_cls.attach, task_cls.compute_loss = recording_attach, counting_compute_loss


def record_augmentations(task_cls):
    """Remember the entropy of the generator each training image is cropped/flipped with (until training ends)."""
    apply, finish = ImageTransform.apply, task_cls.finish

    def recording_apply(self, image, rng=None):
        if rng is not None and "finished" not in seen:
            seen["augmentations"].append(tuple(rng.bit_generator.seed_seq.entropy))
        return apply(self, image, rng)

    def finishing(self, model):
        seen["finished"] = True
        return finish(self, model)

    ImageTransform.apply, task_cls.finish = recording_apply, finishing


def main(stage: str, prefix: str, *overrides: str) -> None:
    cfg = load_config(REPO / "configs/tiny.yaml", parse_overrides(list(overrides), stage=stage))
    record(VAETask if stage == "vae" else UNetTask)
    record_augmentations(VAETask if stage == "vae" else UNetTask)
    metrics = (train_vae if stage == "vae" else train_unet)(cfg)
    accelerator = seen["accelerator"]
    weights = {
        name: {k: v.detach().cpu() for k, v in accelerator.unwrap_model(module).state_dict().items()}
        for name, module in seen["modules"].items()
    }
    torch.save(
        {"weights": weights, "images": seen["images"], "first_batch": seen["first_batch"], "losses": seen["losses"],
         "process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
         "device": str(accelerator.device), "augmentations": seen["augmentations"],
         "start_step": metrics.get("start_step")},
        f"{prefix}-rank{accelerator.process_index}.pt",
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
