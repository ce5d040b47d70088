"""What the training loop logs: values averaged over micro-batches and processes, LR, speed, hyperparameters, and
the sample grids of the EMA weights."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn

from ldm.train.ema import ema_weights


def flat_hparams(tree: dict, prefix: str = "") -> dict[str, Any]:
    """TensorBoard's hparams take scalars only: flatten sections, stringify lists and None."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class Clock:
    """Images per second between logging steps."""

    def __init__(self, step: int, global_batch: int):
        self.tick, self.step, self.global_batch = time.perf_counter(), step, global_batch

    def images_per_sec(self, step: int) -> float:
        now = time.perf_counter()
        speed = (step - self.step) * self.global_batch / (now - self.tick)
        self.tick, self.step = now, step
        return speed


def accumulate(state, values: dict[str, torch.Tensor]) -> None:
    """Add `values` to the on-device sums that the next logging step averages (nothing is read on the host)."""
    for key, value in values.items():
        state.loss_sum[key] = state.loss_sum.get(key, 0.0) + torch.as_tensor(value).detach().float()
        state.loss_count[key] = state.loss_count.get(key, 0) + 1


def commit_step(state, grad_norms: dict[str, torch.Tensor]) -> None:
    """The micro-batch logs of the step just taken (`state.pending`) and its gradient norms join the sums logged
    next; a step skipped as bad drops its pending logs instead."""
    for key, values in state.pending.items():
        for value in values:
            accumulate(state, {key: value})
    state.pending = {}
    accumulate(state, grad_norms)


def log_step(accelerator: Accelerator, state, lr_scheduler, images_per_sec: float, progress) -> None:
    """Average the logged values over micro-batches and processes, with the LR, the speed and the number of steps
    skipped for a NaN/Inf loss or gradient so far in this run."""
    values = {}
    for key, total in state.loss_sum.items():
        mean = torch.as_tensor(total, device=accelerator.device) / state.loss_count[key]
        values[f"train/{key}"] = accelerator.reduce(mean, "mean").item()
    values["train/lr"] = lr_scheduler.get_last_lr()[0]
    values["train/images_per_sec"] = images_per_sec
    values["train/bad_steps"] = state.bad_steps
    state.loss_sum, state.loss_count = {}, {}
    accelerator.log(values, step=state.global_step)
    if "train/loss" in values:  # absent when every step since the last log was skipped
        progress.set_postfix(loss=f"{values['train/loss']:.4f}", img_s=f"{images_per_sec:.1f}", refresh=False)


def write_sample_grid(task, accelerator: Accelerator, model: nn.Module, ema: EMAModel | None, stage_dir: Path,
                      step: int) -> Path | None:
    """Sample from the EMA weights (restored afterwards), save the grid as PNG and log it to the trackers."""
    if not accelerator.is_main_process:
        return None
    with ema_weights(accelerator, model, ema) as sampling_model:
        grid = task.sample_grid(sampling_model, step)
    if grid is None:
        return None
    path = stage_dir / "samples" / f"step-{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    image = np.asarray(grid.convert("RGB"))[None]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": image}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"samples": list(image)}, step=step)
    return path
