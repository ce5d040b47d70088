"""Training checkpoints: written atomically, pruned to the newest N, found again on resume.

A checkpoint is `accelerator.save_state` (models as safetensors, optimizer, LR scheduler, RNG states of every
process) plus the EMA weights (safetensors, keyed by parameter name), the position in the data (epoch and batches
consumed, which a step skipped by the fp16 gradient scaler makes differ from the step count) and the resolved run
config. It is written
as `checkpoint-<step>.tmp` and renamed when complete, so a crash mid-write never leaves a checkpoint that looks
whole, and the previous checkpoints stay untouched.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm.config import RunConfig, save_config

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
EMA_WEIGHTS = "ema.safetensors"
POSITION = "training_state.json"


def save(accelerator, model: torch.nn.Module, ema, run_cfg: RunConfig, checkpoint_dir: Path,
         position: dict[str, int], limit: int | None) -> Path:
    """Write checkpoint-<step> (step = position["global_step"]) atomically; keep the newest `limit`."""
    step = position["global_step"]
    tmp = temporary_path(checkpoint_dir, step)
    accelerator.save_state(str(tmp))  # every process writes its RNG state into tmp...
    accelerator.wait_for_everyone()  # ...before the main process renames tmp
    final = Path(checkpoint_dir) / f"checkpoint-{step}"
    if accelerator.is_main_process:
        if ema is not None:
            save_ema(ema, accelerator.unwrap_model(model), tmp)
        (tmp / POSITION).write_text(json.dumps(position, indent=1) + "\n")
        save_config(run_cfg, tmp / "config.yaml")
        final = finalize(checkpoint_dir, step, limit)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, model: torch.nn.Module, ema, path: Path) -> tuple[int, dict[str, int] | None]:
    """Restore the training state of checkpoint `path`; return its step and its data position (None for a
    checkpoint written before the position was saved)."""
    accelerator.load_state(str(path))
    if ema is not None:
        load_ema(ema, accelerator.unwrap_model(model), path, accelerator.device)
    position = Path(path) / POSITION
    return checkpoint_step(path), json.loads(position.read_text()) if position.is_file() else None


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like checkpoint-1000)")
    return int(match.group(1))


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (unfinished `.tmp` directories are ignored)."""
    if not Path(checkpoint_dir).is_dir():
        return []
    found = [p for p in Path(checkpoint_dir).iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=checkpoint_step)


def resolve_resume_path(resume_from: str | None, checkpoint_dir: Path) -> Path | None:
    """`latest` -> newest checkpoint (None if there is none yet: a fresh start); a path -> that checkpoint."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(checkpoint_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(
            f"train.resume_from_checkpoint={resume_from}: no such directory; use 'latest' or one of "
            f"{[p.name for p in list_checkpoints(checkpoint_dir)] or 'the checkpoint-<step> folders of a run'}"
        )
    checkpoint_step(path)
    return path


def temporary_path(checkpoint_dir: Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"checkpoint-{step}.tmp"


def finalize(checkpoint_dir: Path, step: int, total_limit: int | None) -> Path:
    """Rename the finished temporary checkpoint into place, then drop the oldest beyond `total_limit`."""
    final = Path(checkpoint_dir) / f"checkpoint-{step}"
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        shutil.rmtree(final)
    temporary_path(checkpoint_dir, step).rename(final)
    if total_limit is not None:
        for old in list_checkpoints(checkpoint_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def save_ema(ema, model: torch.nn.Module, directory: Path) -> None:
    """EMA shadow weights keyed by the model's parameter names (safetensors); its counters as metadata."""
    names = [name for name, _ in model.named_parameters()]
    tensors = {name: p.detach().contiguous().cpu() for name, p in zip(names, ema.shadow_params)}
    counters = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    save_file(tensors, str(Path(directory) / EMA_WEIGHTS), metadata={"ema_state": json.dumps(counters)})


def load_ema(ema, model: torch.nn.Module, directory: Path, device) -> None:
    from safetensors import safe_open

    path = Path(directory) / EMA_WEIGHTS
    tensors = load_file(str(path), device=str(device))
    with safe_open(str(path), framework="pt") as f:
        counters = json.loads(f.metadata()["ema_state"])
    names = [name for name, _ in model.named_parameters()]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{path} lacks EMA weights for {missing[:3]}...; the checkpoint belongs to another model")
    ema.load_state_dict({**counters, "shadow_params": [tensors[n] for n in names]})

