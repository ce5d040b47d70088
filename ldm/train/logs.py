"""What the training loop logs: values averaged over micro-batches and processes, LR, speed, hyperparameters."""

from __future__ import annotations

import time
from typing import Any

import torch
from accelerate import Accelerator


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
