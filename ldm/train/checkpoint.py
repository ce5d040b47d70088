"""Training checkpoints: written atomically, pruned to the newest N, found again on resume.

A checkpoint is `accelerator.save_state` (models as safetensors, optimizer, LR scheduler, RNG states of every
process) plus the EMA weights (safetensors, keyed by parameter name), the position in the data (epoch and batches
consumed, which a step skipped by the fp16 gradient scaler makes differ from the step count) and the resolved run
config. It is written
as `checkpoint-<step>.tmp` and renamed when complete, so a crash mid-write never leaves a checkpoint that looks
whole, and the previous checkpoints stay untouched. A write that fails (disk full, no permission) on any process
stops the run with a CheckpointError that names the checkpoint kept.

Loading safety: the optimizer, LR-scheduler and RNG states are pickles (accelerate reads them with torch's
restricted `weights_only` unpickler). They are read only from a checkpoint folder of the user's own runs: a local
directory (never a Hub download) whose every file matches the sha256 list (`checksums.json`) written with it, so a
truncated, tampered or foreign file stops the resume with an error naming that file before anything is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
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
CHECKSUMS = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back; the message names the file and says what to do."""


def save(accelerator, model: torch.nn.Module, ema, run_cfg: RunConfig, checkpoint_dir: Path,
         position: dict[str, int], limit: int | None, budget=None, posthoc=None) -> Path:
    """Write checkpoint-<step> (step = position["global_step"]) atomically; keep the newest `limit`; with the plan
    and spent time of a time budget (`ldm.train.budget.TimeBudget`), if the run has one, and the power-function
    averages of a post-hoc EMA (`ldm.train.posthoc_ema.PosthocEMA`), if it has one.

    1. the main process clears a `.tmp` left by a run killed mid-write;
    2. every process writes its part (accelerate: model and optimizer from the main one, RNG states from each);
    3. the main process adds the EMA, the data position, the config and the checksums of every file;
    4. if any process failed (disk full, no permission), all raise CheckpointError and the `.tmp` is removed;
    5. else the main process renames `.tmp` into place and prunes old checkpoints.
    """
    step = position["global_step"]
    tmp = temporary_path(checkpoint_dir, step)
    final = Path(checkpoint_dir) / f"checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))  # every process writes its RNG state into tmp...
        accelerator.wait_for_everyone()  # ...before the main process completes tmp
        if accelerator.is_main_process:
            if ema is not None:
                save_ema(ema, accelerator.unwrap_model(model), tmp)
            (tmp / POSITION).write_text(json.dumps(position, indent=1) + "\n")
            save_config(run_cfg, tmp / "config.yaml")
            if budget is not None:
                budget.save(tmp)
            if posthoc is not None:
                posthoc.ema.save(tmp)
            write_checksums(tmp)
    except OSError as e:
        error = e
    if any_process(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(f"checkpoint {final}", error, checkpoint_dir, checkpoint_dir) from error
    if accelerator.is_main_process:
        final = finalize(checkpoint_dir, step, limit)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def write_failed(what: str, error: OSError | None, checkpoint_dir: Path, directory: Path,
                 also_intact: str = "") -> CheckpointError:
    """The one-line error of a failed write of `what` (a checkpoint, <stage>/best) into `directory`: the cause, the
    checkpoints kept (and `also_intact`), and how to go on."""
    kept = ", ".join(p.name for p in list_checkpoints(checkpoint_dir)) or "none yet"
    return CheckpointError(
        f"could not write {what}: {error or 'another process failed to write its part'}. The checkpoints already "
        f"saved are intact ({kept}){also_intact}. Free disk space or fix the permissions of {directory}, then "
        "continue with --train.resume_from_checkpoint=latest")


def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` is set on any process (all processes must call this)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
    return bool(total.item() > 0)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """sha256 and size of every file of a checkpoint, as checksums.json beside them."""
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(directory)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    (Path(directory) / CHECKSUMS).write_text(json.dumps(sums, indent=1) + "\n")


def verify_checksums(directory: Path) -> None:
    """CheckpointError naming the first file of `directory` that is missing, added, truncated or changed since
    write_checksums, before any of them is read."""
    directory = Path(directory)
    listed = directory / CHECKSUMS
    advice = "resume from an earlier checkpoint (--train.resume_from_checkpoint=<its folder>) or start afresh"
    if not listed.is_file():
        raise CheckpointError(f"{directory} has no {CHECKSUMS}: it was not written (completely) by ldm's training, "
                              f"and its pickled optimizer and RNG states are not read from such a folder; {advice}")
    try:
        sums = json.loads(listed.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{listed} is corrupt ({e}); {advice}") from e
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS}
    for name in sorted(present - set(sums)):
        raise CheckpointError(f"{directory / name} was not part of the checkpoint when it was written; {advice}")
    for name, expected in sums.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint; {advice}")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path} is truncated or was changed: {size} bytes, {expected['bytes']} when it "
                                  f"was written; {advice}")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} was changed after it was written (sha256 differs); {advice}")


def load(accelerator, model: torch.nn.Module, ema, path: Path, posthoc=None) -> tuple[int, dict[str, int] | None]:
    """Restore the training state of checkpoint `path` (and the averages of a post-hoc EMA); return its step and its
    data position (None for a checkpoint written before the position was saved)."""
    verify_checksums(path)
    accelerator.load_state(str(path))
    if ema is not None:
        load_ema(ema, accelerator.unwrap_model(model), path, accelerator.device)
    if posthoc is not None:
        posthoc.ema.load(path, "denoiser.train.ema_posthoc")
    position = Path(path) / POSITION
    return checkpoint_step(path), json.loads(position.read_text()) if position.is_file() else None


# The settings that fix the shapes of a stage's weights and data, or what the weights mean: a checkpoint holding other
# values cannot be resumed. denoiser.task: a super-resolution denoiser takes the low-res image as extra input channels;
# denoiser.diffusion.objective: a DDPM network predicts ε (or v), a flow network the velocity, from other inputs.
# Keyed by stage name (the denoiser stage is "unet", its folder's name).
SHAPE_KEYS = {"vae": ("data.resolution", "data.color_mode", "vae.model", "vae.loss.disc_weight", "vae.loss.disc_layers",
                      "vae.pretrained", "vae.finetune"),
              "unet": ("data.resolution", "data.color_mode", "denoiser.model", "denoiser.conditioning",
                       "denoiser.text_encoder", "denoiser.text_model", "denoiser.task", "denoiser.diffusion.objective"),
              # ldm distill: the teacher, and the grid and guidance of the trajectories the student learns.
              "distill": ("data.resolution", "data.color_mode", "distill.teacher", "distill.skip_interval",
                          "distill.guidance_scale", "distill.timestep_scaling")}


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def check_same_run(run_cfg: RunConfig, stage: str, saved_config: Path, what: str) -> None:
    """ConfigError naming every shape-deciding key (SHAPE_KEYS) whose value in `saved_config` (the config.yaml of a
    checkpoint or of a run directory) differs from `run_cfg`'s, before any weights are loaded or overwritten. A key
    that `saved_config` lacks was written before the key existed: it held the default then."""
    import yaml

    from ldm.config import ConfigError, renamed_sections, to_dict

    if not Path(saved_config).is_file():
        return
    # renamed_sections: a config saved before a section was renamed (`unet:` for `denoiser:`) compares as the same run.
    saved_tree = renamed_sections(yaml.safe_load(Path(saved_config).read_text()) or {}, str(saved_config))
    saved = {**_flat(to_dict(RunConfig())), **_flat(saved_tree)}
    now = _flat(to_dict(run_cfg))
    differ = [f"{key}={saved.get(key)!r} (now {now.get(key)!r})" for key in sorted(now)
              if key.startswith(SHAPE_KEYS[stage]) and saved.get(key) != now.get(key)]
    if differ:
        raise ConfigError(f"{what} was written by a run with other settings: {', '.join(differ)}. Use the same "
                          "settings, or another output_dir for the new run.")


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
    """Rename the finished temporary checkpoint into place, then drop the oldest beyond `total_limit`. A checkpoint
    being replaced or removed is first renamed out of the `checkpoint-<step>` namespace, so a crash here never leaves
    a half-deleted folder that `latest` would pick."""
    final = Path(checkpoint_dir) / f"checkpoint-{step}"
    replaced = move_into_place(temporary_path(checkpoint_dir, step), final)  # the same step saved again (a resume)
    old = [replaced] if replaced is not None else []
    if total_limit is not None:
        old += [_set_aside(p) for p in list_checkpoints(checkpoint_dir)[:-total_limit]]
    for path in old:
        shutil.rmtree(path)
    return final


def move_into_place(tmp: Path, final: Path) -> Path | None:
    """Rename the complete directory `tmp` to `final`. A `final` already there is first renamed out of the way and
    returned, for the caller to delete: a crash never leaves a `final` that is half old, half new."""
    old = _set_aside(final) if final.exists() else None
    tmp.rename(final)
    return old


@contextlib.contextmanager
def written_atomically(final: Path):
    """Yield an empty temporary sibling of directory `final` to write into; when the block completes, it replaces
    `final` as a checkpoint is put in place (`move_into_place`). If the block fails the temporary folder is removed
    and `final` stays as it was; one left by a process killed mid-write is cleared on the next write."""
    final = Path(final)
    tmp = final.with_name(f"{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = move_into_place(tmp, final)
    if old is not None:
        shutil.rmtree(old)


def _set_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.old")
    if aside.exists():  # left by a run killed while deleting it
        shutil.rmtree(aside)
    return path.rename(aside)


def save_ema(ema, model: torch.nn.Module, directory: Path) -> None:
    """EMA shadow weights keyed by the model's parameter names (safetensors); its counters as metadata."""
    names = [name for name, _ in model.named_parameters()]
    tensors = {name: p.detach().contiguous().cpu() for name, p in zip(names, ema.shadow_params)}
    counters = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    save_file(tensors, str(Path(directory) / EMA_WEIGHTS), metadata={"ema_state": json.dumps(counters)})


def load_ema(ema, model: torch.nn.Module, directory: Path, device) -> None:
    from safetensors import safe_open

    path = Path(directory) / EMA_WEIGHTS
    # Read on the CPU, then moved: safetensors rejects device names such as "cpu:0" (multi-process CPU runs).
    tensors = {name: t.to(device) for name, t in load_file(str(path)).items()}
    with safe_open(str(path), framework="pt") as f:
        counters = json.loads(f.metadata()["ema_state"])
    names = [name for name, _ in model.named_parameters()]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{path} lacks EMA weights for {missing[:3]}...; the checkpoint belongs to another model")
    ema.load_state_dict({**counters, "shadow_params": [tensors[n] for n in names]})

