"""The training DataLoader: shuffled batches of a map-style data set, or this process's part of a stream."""

from __future__ import annotations

import signal

import datasets
import torch
from accelerate import PartialState
from datasets.distributed import split_dataset_by_node

from ldm.config import RunConfig, TrainConfig

STREAM_SHUFFLE_BUFFER = 1000  # examples a streamed data set shuffles among (on top of shuffling its shard order)


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """worker_init_fn: a loader worker ignores SIGTERM and SIGINT.

    A scheduler (Slurm, Kubernetes) and Ctrl-C signal every process of the job, the workers included. PyTorch's own
    worker handler re-raises a SIGTERM that does not come from the parent, so the worker dies and the main process
    fails mid-step with "DataLoader worker ... killed by signal" before it can write its checkpoint
    (ldm.train.faults). Ignored here, the signal is the main process's alone: it finishes the step, checkpoints and
    shuts the workers down. A worker whose main process dies still exits (PyTorch's watchdog sees the parent go).
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def make_train_loader(dataset, collate_fn, run_cfg: RunConfig, train_cfg: TrainConfig) -> torch.utils.data.DataLoader:
    """A shuffling DataLoader over a map-style data set, or over this process's part of a stream.

    A stream (datasets.IterableDataset, data.streaming) has no length and no random access: it shuffles its shard
    order plus a buffer (reshuffled per epoch by `set_epoch`) and is split across processes by
    `split_dataset_by_node` (whole shards when their number divides by the world size, else every k-th example).
    """
    streamed = isinstance(dataset, torch.utils.data.IterableDataset)
    if isinstance(dataset, datasets.IterableDataset):
        state = PartialState()
        dataset = dataset.shuffle(seed=train_cfg.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
        dataset = split_dataset_by_node(dataset, rank=state.process_index, world_size=state.num_processes)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train_cfg.batch_size, shuffle=not streamed, drop_last=True, collate_fn=collate_fn,
        num_workers=run_cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=run_cfg.data.num_workers > 0,
        worker_init_fn=leave_stop_signals_to_the_main_process,
        # Its own generator: starting an epoch's iterator draws a worker seed from it, and a draw from the global
        # RNG there would shift every later noise sample of a resumed run.
        generator=torch.Generator().manual_seed(train_cfg.seed),
    )
    if not streamed and len(loader) == 0:
        raise ValueError(
            f"{len(dataset)} training images are fewer than one batch of train.batch_size={train_cfg.batch_size}; "
            "lower the batch size or add images"
        )
    return loader


def set_epoch(loader, epoch: int) -> None:
    # A prepared loader forwards the epoch to its sampler (the data order); the data set takes it where it has a
    # use for it: a stream reshuffles (a stream's DataLoader is not prepared, see fit), AugmentedImages draws that
    # epoch's crops and flips (accelerate does not pass the epoch on to a data set when its sampler takes it).
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
