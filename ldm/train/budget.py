"""Wall-clock budgets (`train.max_minutes`): how many optimizer steps fit into the time a run is given.

A run with a budget does not know its length in steps when it starts, yet the LR schedule (cosine decay, the
discriminator start of the autoencoder) is a function of that length. So:

1. The first step is not timed (one-time costs: memory allocation, cuDNN autotuning, compilation).
2. The next `train.budget_probe_steps` steps are timed; their mean is the step time.
3. The step count is fixed once: the steps done plus as many more as the remaining time holds at that step time.
   It is saved in every checkpoint with the budget and the time spent so far, so a resumed run finishes the same
   schedule within what is left of the same budget. A run resumed with another `train.max_minutes` plans again:
   the steps done plus as many as the new budget less the time already spent holds at the probed step time; the
   LR schedule is the same schedule stretched (or shrunk) to the new length from the current step on.
4. Whatever the plan, training stops after the step during which the budget runs out (later steps can be slower
   than the probed ones: a discriminator that starts, a busier machine), so a run ends within one step of its
   budget; it then writes a final checkpoint and its model as usual.

The clock is `time.monotonic`, read once per step (`clock` here, so tests can replace it).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

BUDGET_FILE = "budget.json"  # in every checkpoint of a run with a budget
UNPLANNED_STEPS = 10**9  # the LR schedule's length until the plan is fixed: no decay has started by then

clock = time.monotonic


class TimeBudget:
    """Counts the seconds of one training stage against `max_minutes` and fixes its number of steps."""

    def __init__(self, max_minutes: float, probe_steps: int, start: float | None = None):
        self.seconds = 60.0 * max_minutes
        self.probe_steps = probe_steps
        self.planned_steps: int | None = None  # fixed by the probe, or read from a checkpoint
        self.seconds_per_step: float | None = None  # the probe's measurement
        self.spent_before = 0.0  # seconds spent by the runs this one resumes
        self.planned_for: float | None = None  # the budget in seconds that a resumed plan was made for
        self.start = clock() if start is None else start  # the stage may start the clock before its data work
        self.now = self.start
        self._probe_start: tuple[int, float] | None = None  # (step, time) at which the probe began

    def elapsed(self) -> float:
        return self.spent_before + self.now - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def step_done(self, step: int) -> bool:
        """Read the clock after optimizer step `step`; fix the plan when the probe ends. True when the budget is
        spent, i.e. this step must be the last one."""
        self.now = clock()
        if self.planned_steps is None:
            if self._probe_start is None:
                self._probe_start = (step, self.now)  # step 1 (or the first step after a resume) is not timed
            elif step - self._probe_start[0] >= self.probe_steps:
                first, began = self._probe_start
                self.seconds_per_step = (self.now - began) / (step - first)
                self.planned_steps = step + max(0, math.floor(self.remaining() / self.seconds_per_step))
        return self.remaining() <= 0

    def state_dict(self) -> dict:
        return {"max_minutes": self.seconds / 60.0, "planned_steps": self.planned_steps,
                "seconds_per_step": self.seconds_per_step, "elapsed_seconds": self.elapsed()}

    def load_state_dict(self, state: dict) -> None:
        """Continue a checkpoint's budget: its plan (if the probe had ended) and the time it had spent."""
        self.planned_steps = state["planned_steps"]
        self.seconds_per_step = state["seconds_per_step"]
        self.spent_before = state["elapsed_seconds"]
        self.planned_for = 60.0 * state["max_minutes"]

    def save(self, directory: Path) -> None:
        (Path(directory) / BUDGET_FILE).write_text(json.dumps(self.state_dict(), indent=2) + "\n")

    def load(self, directory: Path) -> bool:
        """Load the budget state saved in checkpoint `directory`; False if it has none (a run without budget)."""
        path = Path(directory) / BUDGET_FILE
        if not path.is_file():
            return False
        self.load_state_dict(json.loads(path.read_text()))
        return True

    def replan(self, step: int) -> str | None:
        """After `load`, at the resumed optimizer step `step`: if this run's budget is not the one the plan was made
        for, plan the rest again from the time left (this budget less the time already spent) at the probed step
        time; a plan the probe had not fixed yet is fixed by the probe, from the new budget. Returns what changed
        (None: the same budget, the same plan)."""
        if self.planned_for is None or math.isclose(self.planned_for, self.seconds):
            return None
        before = self.planned_steps
        if self.seconds_per_step is not None:
            self.planned_steps = step + max(0, math.floor(self.remaining() / self.seconds_per_step))
        plan = (f"re-planned to {self.planned_steps} steps (was {before})" if self.seconds_per_step is not None
                else "the probe plans the steps from the new budget")
        return (f"train.max_minutes changed from {self.planned_for / 60:.4g} to {self.seconds / 60:.4g} on resume: "
                f"{self.elapsed() / 60:.4g} min spent, {max(0.0, self.remaining()) / 60:.4g} min left at step {step}, "
                f"{plan}")

    def describe(self) -> str:
        if self.seconds_per_step is None:  # a process that received the plan from the main process
            return f"time budget {self.seconds / 60:.4g} min -> {self.planned_steps} steps"
        return (f"time budget {self.seconds / 60:.4g} min: {1000 * self.seconds_per_step:.0f} ms per step over "
                f"{self.probe_steps} steps -> {self.planned_steps} steps")


def start(train_cfg, started_at: float | None, resume_path: Path | None) -> tuple[TimeBudget | None, str | None]:
    """The stage's time budget (None without train.max_minutes), counting from `started_at` (a `clock()` reading)
    or from now. Resumed from checkpoint `resume_path`, it continues the time that checkpoint had spent and its plan,
    planned again if train.max_minutes changed; the second value says so (`TimeBudget.replan`)."""
    from ldm.train.checkpoint import checkpoint_step

    if train_cfg.max_minutes is None:
        return None, None
    budget = TimeBudget(train_cfg.max_minutes, train_cfg.budget_probe_steps, start=started_at)
    if resume_path is None or not budget.load(resume_path):
        return budget, None
    return budget, budget.replan(checkpoint_step(resume_path))


def schedule_steps(max_steps: int, budget: TimeBudget | None) -> int:
    """Length of the LR schedule (and of the run, for `vae.loss.disc_start` fractions): max_steps without a budget,
    else the plan, or UNPLANNED_STEPS while the probe is still timing."""
    if budget is None:
        return max_steps
    return budget.planned_steps if budget.planned_steps is not None else UNPLANNED_STEPS


def resize_lr_schedule(lr_scheduler, train_cfg, total_steps: int, num_processes: int) -> None:
    """Give a (possibly accelerate-wrapped) LambdaLR the shape of a `total_steps` run from its current position on:
    the same diffusers schedule (get_scheduler) with the new length, and the current LR recomputed from it."""
    from diffusers.optimization import get_scheduler

    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps the LambdaLR
    sized = get_scheduler(train_cfg.lr_scheduler, optimizer=inner.optimizer,
                          num_warmup_steps=train_cfg.lr_warmup_steps * num_processes,
                          num_training_steps=total_steps * num_processes)
    inner.lr_lambdas = sized.lr_lambdas
    for group, base_lr, lr_lambda in zip(inner.optimizer.param_groups, inner.base_lrs, inner.lr_lambdas):
        group["lr"] = base_lr * lr_lambda(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]


def agree(accelerator, budget: TimeBudget, out_of_time: bool) -> bool:
    """Processes read different clocks: all follow the main process's plan and stop decision (one broadcast)."""
    if accelerator.num_processes == 1:
        return out_of_time
    from accelerate.utils import broadcast_object_list

    decision = broadcast_object_list([budget.planned_steps, budget.seconds_per_step, out_of_time], from_process=0)
    budget.planned_steps, budget.seconds_per_step, out_of_time = decision
    return out_of_time


def count_step(task, train_cfg, accelerator, budget: TimeBudget, lr_scheduler, progress, step: int) -> bool:
    """Count optimizer step `step` against the time budget; True if it is the last one. When the probe fixes the
    plan, the LR schedule (and the task's own step-dependent settings) are sized to it."""
    unplanned = budget.planned_steps is None
    out_of_time = agree(accelerator, budget, budget.step_done(step))
    if unplanned and budget.planned_steps is not None:
        resize_lr_schedule(lr_scheduler, train_cfg, budget.planned_steps, accelerator.num_processes)
        if hasattr(task, "set_run_length"):
            task.set_run_length(budget.planned_steps)
        progress.total = budget.planned_steps
        accelerator.print(budget.describe())
    return out_of_time or (budget.planned_steps is not None and step >= budget.planned_steps)
