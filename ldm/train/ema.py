"""The exponential moving average of the trained weights: what is sampled, evaluated and saved.

The spine builds it (`make_ema`) and steps it after each optimizer step that counts; checkpoints save and restore it
(`checkpoint.save_ema` / `load_ema`); sample grids and evaluations during training swap it in with `ema_weights`.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn

from ldm.config import TrainConfig


def make_ema(model: nn.Module, train_cfg: TrainConfig, device: torch.device) -> EMAModel | None:
    """diffusers' EMAModel of `model`'s parameters (decay train.ema_decay, warm-up train.ema_warmup), or None
    without train.use_ema."""
    if not train_cfg.use_ema:
        return None
    ema = EMAModel(model.parameters(), decay=train_cfg.ema_decay, use_ema_warmup=train_cfg.ema_warmup)
    ema.to(device)
    return ema


@contextlib.contextmanager
def ema_weights(accelerator: Accelerator, model: nn.Module, ema: EMAModel | None):
    """The unwrapped model with the EMA weights loaded, in eval mode, for sampling; afterwards the training weights,
    train mode and the RNG streams are as they were (sampling must not shift a resumed run's random numbers)."""
    model = accelerator.unwrap_model(model)
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    try:
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
            yield model
    finally:
        model.train()
        if ema is not None:
            ema.restore(model.parameters())
