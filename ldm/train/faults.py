"""What goes wrong in a long run and how the training loop answers, so that nothing saved is lost.

- A loss or gradient that is NaN or Inf: the optimizer step is skipped (weights, optimizer moments, LR schedule and
  EMA stay as they were), counted and logged as `train/bad_steps`; `train.max_bad_steps` of them in a row stop the
  run with a NumericalError naming the step and the last good checkpoint. (fp16 overflow stays with the gradient
  scaler, which skips such steps itself.)
- Weights that hold NaN or Inf are never saved: every checkpoint, unet/best and the final model is checked first.
- SIGTERM or SIGINT (how Slurm, Kubernetes and Ctrl-C stop a job): the step under way is finished, a checkpoint is
  written at that step boundary, and the run stops with TrainingInterrupted, whose message says how to resume.
  A second SIGINT (Ctrl-C again) interrupts at once. More SIGTERMs are the same request: a scheduler signals every
  process of the job and torchrun forwards the one it got, so a training process under `accelerate launch
  --multi_gpu` receives two (a scheduler escalates with SIGKILL, not with another SIGTERM). Loader workers ignore
  both signals (ldm.train.loader), so the main process alone answers them.

Every process takes part in each decision (one all-reduce of a few flags per optimizer step), so processes never
disagree on whether a step counts or the run stops.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch
from torch import nn

from ldm.train import checkpoint

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NumericalError(RuntimeError):
    """Training cannot go on: NaN/Inf losses or gradients kept coming, or the weights themselves are not finite."""


class TrainingInterrupted(Exception):
    """A stop signal was received; a checkpoint was written at the step boundary. `exit_code` is 128 + the signal
    number, what a shell reports for a process ended by that signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGINT only record that a stop was asked for (`received`); the
    previous handlers come back on exit. A second SIGINT raises KeyboardInterrupt at once; a repeated SIGTERM is
    the same request again."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def step_flags(accelerator, losses_finite: torch.Tensor, grad_norms: dict[str, torch.Tensor],
               signals: StopSignals) -> tuple[bool, bool]:
    """(this step's loss or gradients are NaN/Inf on any process, any process received a stop signal): the one
    host read of an optimizer step."""
    grads_finite = torch.stack([torch.isfinite(n).all() for n in grad_norms.values()]).all() if grad_norms else True
    bad = ~(losses_finite & grads_finite)
    flags = torch.stack([bad.float(), torch.tensor(float(signals.received is not None), device=bad.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "sum")
    bad_anywhere, stop_anywhere = flags.tolist()
    return bad_anywhere > 0, stop_anywhere > 0


def last_checkpoint_text(checkpoint_dir: Path) -> str:
    found = checkpoint.list_checkpoints(checkpoint_dir)
    return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"


def too_many_bad_steps(count: int, step: int, checkpoint_dir: Path) -> NumericalError:
    """`count` attempts in a row at optimizer step `step` (each on the next micro-batches) were NaN/Inf."""
    return NumericalError(
        f"{count} tries in a row at optimizer step {step} had a NaN or Inf loss or gradient and were skipped (the "
        f"last step taken is {step - 1}); training stopped: {last_checkpoint_text(checkpoint_dir)}. Lower "
        "train.learning_rate, set train.max_grad_norm, or use bf16 instead of fp16, then continue with "
        "--train.resume_from_checkpoint=latest (train.max_bad_steps sets how many are tolerated)."
    )


def check_finite_weights(modules: dict[str, nn.Module], ema, step: int, what: str, checkpoint_dir: Path) -> None:
    """NumericalError naming the first parameter (of `modules`, or the EMA's) that holds NaN or Inf, before `what`
    is saved: a checkpoint or model with such weights would be useless and could replace a good one."""
    named = [(f"{name}.{p_name}", p) for name, module in modules.items() for p_name, p in module.named_parameters()]
    if ema is not None:
        named += [(f"EMA of model.{i}", p) for i, p in enumerate(ema.shadow_params)]
    flags = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
    if bool(flags.all()):
        return
    first = named[int((~flags).nonzero()[0])][0]
    raise NumericalError(
        f"at step {step} the weights hold NaN or Inf (first: {first}); {what} was not saved, and "
        f"{last_checkpoint_text(checkpoint_dir)}. Lower train.learning_rate or set train.max_grad_norm, then "
        "continue from that checkpoint with --train.resume_from_checkpoint=latest."
    )


def interrupted(signum: int, step: int, saved: Path) -> TrainingInterrupted:
    name = signal.Signals(signum).name
    return TrainingInterrupted(
        f"{name} received: stopped at step {step} after writing {saved}. Continue with the same command and "
        "--train.resume_from_checkpoint=latest", signum)
