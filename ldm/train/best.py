"""The best model so far, `<stage>/best/`: the weights that scored best on the stage's evaluation metric
(`train.eval_every`), with their scores in `metrics.json`.

- It is written as a checkpoint is (`ldm.train.checkpoint.written_atomically`): into a temporary sibling renamed into
  place when complete, so a kill in the middle of the write leaves the previous best/ whole. A write that fails (disk
  full, no permission) stops the run on every process with the one-line CheckpointError of a failed checkpoint write.
- The score to beat is read back from best/metrics.json only when the run resumes from a checkpoint, and only if it
  was measured with the same metric (its "metric" key): a fresh run starts its own best/ whatever an earlier run in
  the same output_dir left there, and a resumed run whose metric changed does not compare, say, an IS with a FID.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldm.config import TrainConfig
from ldm.train import checkpoint, faults

METRICS = "metrics.json"


def resumed_best(stage_dir: Path, train_cfg: TrainConfig, key: str) -> float | None:
    """The best score of the run being resumed (train.resume_from_checkpoint finds a checkpoint), if it was measured
    as `key` (a result key such as "psnr" or "classifier-FID"); else None: the first evaluation sets it."""
    path = Path(stage_dir) / "best" / METRICS
    resuming = checkpoint.resolve_resume_path(train_cfg.resume_from_checkpoint, Path(stage_dir) / "checkpoints")
    if resuming is None or not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["value"] if saved.get("metric") == key else None


def improves(value: float, best: float | None, higher_is_better: bool) -> bool:
    return best is None or (value > best if higher_is_better else value < best)


def write(best_dir: Path, write_model: Callable[[Path], None], summary: dict[str, Any]) -> None:
    """Write `best_dir` atomically: the model by `write_model(folder)`, then `summary` as metrics.json."""
    with checkpoint.written_atomically(best_dir) as folder:
        write_model(folder)
        (folder / METRICS).write_text(json.dumps(summary, indent=2) + "\n")


def try_write(best_dir: Path, write_model: Callable[[Path], None], summary: dict[str, Any]) -> OSError | None:
    """`write`, returning the OSError (disk full, no permission) for `raise_if_failed` instead of raising it."""
    try:
        write(best_dir, write_model, summary)
    except OSError as e:
        return e
    return None


def raise_if_failed(accelerator, best_dir: Path, error: OSError | None) -> None:
    """Called by every process after the main one may have written `best_dir`: a failed write raises CheckpointError
    on all of them, so that none waits for the others."""
    if checkpoint.any_process(accelerator, error is not None):
        previous = f", and so is the previous {best_dir.name}/" if best_dir.is_dir() else ""
        raise checkpoint.write_failed(f"the best model {best_dir}", error, best_dir.parent / "checkpoints",
                                      best_dir.parent, also_intact=previous) from error


def keep(accelerator, best_dir: Path, best: float | None, value: float, higher_is_better: bool, model,
         write_model: Callable[[Path], None], summary: dict[str, Any]) -> float | None:
    """Called by every process after an evaluation of a denoiser's samples: if `value` beats `best`, the main process
    checks that `model`'s weights are finite and writes `best_dir` (`write_model`, then `summary`); a failed write
    raises on all processes (`raise_if_failed`). Returns the score to beat from now on."""
    error = None
    if improves(value, best, higher_is_better):
        best = value
        if accelerator.is_main_process:
            faults.check_finite_weights({"model": model}, None, summary["step"], str(best_dir),
                                        best_dir.parent / "checkpoints")
            error = try_write(best_dir, write_model, summary)
    raise_if_failed(accelerator, best_dir, error)
    return best
