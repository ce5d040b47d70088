"""Where and how fast training runs: CPU or GPU for a multi-process launch, TF32, channels_last, gradient
checkpointing. Each setting is a no-op where it does not apply (the GPU ones on the CPU), so one config serves both.
"""

from __future__ import annotations

import os

import torch
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ldm.config import ConfigError, TrainConfig


def _has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, ROCm, XPU, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def launched_without_gpu() -> bool:
    """A multi-process launch (WORLD_SIZE > 1) on a machine with no GPU.

    Without cpu=True, accelerate maps such a launch to independent single-process runs (every rank is rank 0 of 1);
    with it, the ranks form one process group over gloo. (`accelerate launch` overwrites ACCELERATE_USE_CPU.)
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator_device()


def process_state():
    """accelerate's PartialState for code that runs outside training (evaluation, caches), CPU launches included."""
    from accelerate import PartialState

    return PartialState(cpu=launched_without_gpu())


def use_cpu(train_cfg: TrainConfig) -> bool:
    """train.cpu, or a multi-process launch on a machine with no GPU (see launched_without_gpu)."""
    return train_cfg.cpu or launched_without_gpu()


def cpu_threads(train_cfg: TrainConfig, local_processes: int) -> int:
    """Threads for a CPU process: the configured number, else this machine's cores shared among its processes.

    `accelerate launch` without `--num_cpu_threads_per_process` sets OMP_NUM_THREADS=1, which would leave all but
    one core idle in a single-process CPU run.
    """
    return train_cfg.num_threads or max(1, (os.cpu_count() or 1) // max(1, local_processes))


def configure_backends(train_cfg: TrainConfig, device: torch.device, local_processes: int = 1) -> None:
    """CPU: the thread count. CUDA: TF32 for fp32 matmuls and convolutions (PyTorch leaves it off for matmuls)."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(train_cfg, local_processes))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = train_cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = train_cfg.allow_tf32


def prepare_for_device(module: nn.Module, train_cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Gradient checkpointing (diffusers models inside `module`) and, on CUDA, the channels_last layout."""
    if train_cfg.gradient_checkpointing:
        diffusers_models = [m for m in module.modules() if isinstance(m, ModelMixin)]
        if not any(m._supports_gradient_checkpointing for m in diffusers_models):
            raise ConfigError(f"train.gradient_checkpointing: {type(module).__name__} does not support it")
        for m in diffusers_models:
            if m._supports_gradient_checkpointing:
                m.enable_gradient_checkpointing()
    if device.type == "cuda" and train_cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    return module
