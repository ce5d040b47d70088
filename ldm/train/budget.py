"""Wall-clock budgets (`train.max_minutes`): how many optimizer steps fit into the time a run is given.

A run with a budget does not know its length in steps when it starts, yet the LR schedule (cosine decay, the
discriminator start of the autoencoder) is a function of that length. So:

1. The first step is not timed (one-time costs: memory allocation, cuDNN autotuning, compilation).
2. The next `train.budget_probe_steps` steps are timed; the step time is the median of the last
   `budget_probe_steps` step times from then on (robust to the odd long step: a checkpoint, an evaluation).
3. The plan (the run's length in steps) is the steps done plus as many more as the remaining time holds at that
   step time. It is made when the probe ends and made again after every step: the plan's error is the step time's
   error times the steps still to go, so re-planning every step lets it vanish as the end nears, whether later steps
   run faster than the probed ones (warm caches, a neighbour job that ended) or slower (a discriminator that starts,
   a busier machine). When the plan moves, the rest of the LR schedule (and the task's step-dependent settings, the
   progress bar) is sized to it, so the LR still reaches its final value at the last step.
4. The run stops after the step that leaves less than one step time, or no time at all: it ends within one step of
   its budget, either side; it then writes a final checkpoint and its model as usual.
5. Every checkpoint holds the budget, the time spent, the plan and the recent step times (`budget.json`), so a
   resumed run continues the same re-planning within what is left of the same budget (against a simulated clock it
   ends bitwise equal to a run that never stopped). A run resumed with another `train.max_minutes` plans again at
   once: the steps done plus as many as the new budget less the time already spent holds at the saved step time;
   the LR schedule is the same schedule stretched (or shrunk) to the new length from the current step on.
6. A stage whose end is decided while it trains (the autoencoder of `ldm train`'s one budget: ldm.train.run_budget)
   runs warmup-stable-decay (`stable_lr`; Hägele et al. 2024): after the warm-up the LR stays at its peak, since no
   end is known to decay towards; `end_early` then moves the end and starts the final decay, in the shape of
   `train.lr_scheduler` (cosine: half a cosine) over the steps from there to the plan. Both are in `budget.json`.

The clock is `time.monotonic`, read once per step (`clock` here, so tests can replace it).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

BUDGET_FILE = "budget.json"  # in every checkpoint of a run with a budget
UNPLANNED_STEPS = 10**9  # the LR schedule's length until the probe makes the first plan: no decay has started by then

clock = time.monotonic


class TimeBudget:
    """Counts the seconds of one training stage against `max_minutes` and plans its number of steps."""

    def __init__(self, max_minutes: float, probe_steps: int, start: float | None = None, stable_lr: bool = False):
        self.seconds = 60.0 * max_minutes
        self.probe_steps = probe_steps  # steps timed before the first plan, and the window of the step time after
        self.planned_steps: int | None = None  # made when the probe ends and after every step since, or read
        self.seconds_per_step: float | None = None  # the median of `recent` that made the plan
        self.recent: list[float] = []  # the times of the last `probe_steps` steps, seconds
        self.spent_before = 0.0  # seconds spent by the runs this one resumes
        self.planned_for: float | None = None  # the budget in seconds that a resumed plan was made for
        self.start = clock() if start is None else start  # the stage may start the clock before its data work
        self.now = self.start
        self._last_reading: float | None = None  # the clock after the previous step; None: step 1 is not timed
        self.stable_lr = stable_lr  # warmup-stable-decay (6): the peak LR until end_early starts the final decay
        self.decay_from: int | None = None  # the step after which the final decay began (end_early)

    def elapsed(self) -> float:
        return self.spent_before + self.now - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def step_done(self, step: int) -> bool:
        """Read the clock after optimizer step `step`, time the step, and plan again once the probe has ended.
        True when the budget is spent, i.e. this step must be the last one."""
        self.now = clock()
        if self._last_reading is not None:
            self.recent = (self.recent + [self.now - self._last_reading])[-self.probe_steps:]
        self._last_reading = self.now
        if self.recent and (self.planned_steps is not None or len(self.recent) >= self.probe_steps):
            # Why the median of the last probe_steps step times: it follows a lasting change of speed (the
            # discriminator starting, a neighbour job) within probe_steps / 2 steps, and ignores the odd long step
            # (a checkpoint, a sample grid, an evaluation, the start-up of a resumed process), which a mean would let
            # pull the whole schedule shorter for probe_steps steps; the time of those steps still counts, as time no
            # longer left. The lower median of an even count, so that of two step times a long one is ignored too.
            # Why every step: see the module docstring (3).
            self.seconds_per_step = statistics.median_low(self.recent)
            self.planned_steps = self.plan(step)
        elif self.remaining() <= 0:  # spent before the probe ended: this step is the whole plan
            self.planned_steps = step
        return self.remaining() <= 0

    def end_early(self, step: int, seconds: float) -> None:
        """End the stage `seconds` after its start instead, the LR decaying from after step `step` to the plan."""
        self.seconds, self.decay_from = seconds, step
        if self.seconds_per_step is not None:
            self.planned_steps = self.plan(step)

    def plan(self, step: int) -> int:
        """The steps done plus as many more as the time left holds at the step time (none once it is spent)."""
        return step + max(0, math.floor(self.remaining() / max(self.seconds_per_step, 1e-9)))  # a coarse clock: 0 s

    def state_dict(self) -> dict:
        state = {"max_minutes": self.seconds / 60.0, "planned_steps": self.planned_steps,
                 "seconds_per_step": self.seconds_per_step, "elapsed_seconds": self.elapsed(),
                 "recent_step_seconds": list(self.recent)}
        return {**state, "decay_from": self.decay_from} if self.stable_lr else state

    def load_state_dict(self, state: dict) -> None:
        """Continue a checkpoint's budget: its plan (if the probe had ended), its recent step times and the time it
        had spent. The first step after the resume is timed too, from the start of this process: the median shrugs
        off its start-up costs, and a run resumed against a simulated clock keeps the plans of one that never
        stopped."""
        self.planned_steps = state["planned_steps"]
        self.seconds_per_step = state["seconds_per_step"]
        # Checkpoints written before the step time was re-measured hold only the probe's step time.
        default = [] if self.seconds_per_step is None else [self.seconds_per_step] * self.probe_steps
        self.recent = list(state.get("recent_step_seconds", default))
        self.spent_before = state["elapsed_seconds"]
        self.planned_for = 60.0 * state["max_minutes"]
        self._last_reading = self.start
        self.decay_from = state.get("decay_from")
        if self.decay_from is not None:  # an end decided in training (end_early) stays whatever budget resumes it
            self.seconds = self.planned_for

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
        for, plan the rest again at once from the time left (this budget less the time already spent) at the saved
        step time; a plan the probe had not made yet is made by the probe, from the new budget. Returns what changed
        (None: the same budget, whose plan the next step continues)."""
        if self.planned_for is None or math.isclose(self.planned_for, self.seconds):
            return None
        before = self.planned_steps
        if self.seconds_per_step is not None:
            self.planned_steps = self.plan(step)
        plan = (f"re-planned to {self.planned_steps} steps (was {before})" if self.seconds_per_step is not None
                else "the probe plans the steps from the new budget")
        return (f"train.max_minutes changed from {self.planned_for / 60:.4g} to {self.seconds / 60:.4g} on resume: "
                f"{self.elapsed() / 60:.4g} min spent, {max(0.0, self.remaining()) / 60:.4g} min left at step {step}, "
                f"{plan}")

    def describe(self) -> str:
        if self.seconds_per_step is None:  # spent before the probe ended
            return f"time budget {self.seconds / 60:.4g} min -> {self.planned_steps} steps"
        return (f"time budget {self.seconds / 60:.4g} min: {1000 * self.seconds_per_step:.0f} ms per step (median of "
                f"the last {len(self.recent)}) -> {self.planned_steps} steps, planned again after every step")

    def summary(self, step: int) -> str:
        """What the budget came to at the run's last step `step`."""
        pace = "" if self.seconds_per_step is None else f", lately {1000 * self.seconds_per_step:.0f} ms per step"
        return (f"time budget {self.seconds / 60:.4g} min: {self.elapsed() / 60:.4g} min used by {step} steps"
                f"{pace}")


def start(train_cfg, started_at: float | None, resume_path: Path | None,
          budget: TimeBudget | None = None) -> tuple[TimeBudget | None, str | None]:
    """The stage's time budget (None without train.max_minutes), counting from `started_at` (a `clock()` reading)
    or from now; or `budget`, made by the caller. Resumed from checkpoint `resume_path`, it continues the time that
    checkpoint had spent and its plan, planned again if the budget changed; the second value says so
    (`TimeBudget.replan`)."""
    from ldm.train.checkpoint import checkpoint_step

    if budget is None:
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


def lr_lambdas(train_cfg, optimizer, total_steps: int, num_processes: int, budget: TimeBudget | None = None) -> list:
    """The LR factors (one per parameter group) of a `total_steps` run: diffusers' train_cfg.lr_scheduler
    (get_scheduler); under a `stable_lr` budget, warmup-stable-decay (6): the warm-up, the peak LR, and from
    `decay_from` on the lr_scheduler's shape over the steps left to `total_steps`. accelerate steps a scheduler once
    per process per optimizer step, hence the factor."""
    from diffusers.optimization import get_scheduler

    n, warmup = num_processes, train_cfg.lr_warmup_steps * num_processes
    if budget is None or not budget.stable_lr:
        return get_scheduler(train_cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup,
                             num_training_steps=total_steps * n).lr_lambdas
    stable = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=warmup).lr_lambdas[0]
    if budget.decay_from is None:
        return [stable] * len(optimizer.param_groups)
    start = budget.decay_from * n
    decay = get_scheduler(train_cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=0,
                          num_training_steps=max(1, total_steps * n - start)).lr_lambdas[0]
    return [lambda step: stable(step) * (decay(step - start) if step > start else 1.0)] * len(optimizer.param_groups)


def resize_lr_schedule(lr_scheduler, train_cfg, total_steps: int, num_processes: int,
                       budget: TimeBudget | None = None) -> None:
    """Give a (possibly accelerate-wrapped) LambdaLR the shape of a `total_steps` run from its current position on:
    the same schedule (`lr_lambdas`) with the new length, and the current LR recomputed from it."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps the LambdaLR
    inner.lr_lambdas = lr_lambdas(train_cfg, inner.optimizer, total_steps, num_processes, budget)
    for group, base_lr, lr_lambda in zip(inner.optimizer.param_groups, inner.base_lrs, inner.lr_lambdas):
        group["lr"] = base_lr * lr_lambda(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]


def agree(accelerator, budget: TimeBudget, out_of_time: bool) -> bool:
    """Processes read different clocks: all follow the main process's plan, end and stop decision (one broadcast
    per step, the plan being made again after every step)."""
    if accelerator.num_processes == 1:
        return out_of_time
    from accelerate.utils import broadcast_object_list

    decision = broadcast_object_list([budget.planned_steps, budget.seconds_per_step, budget.seconds,
                                      budget.decay_from, out_of_time], from_process=0)
    budget.planned_steps, budget.seconds_per_step, budget.seconds, budget.decay_from, out_of_time = decision
    return out_of_time


def count_step(task, train_cfg, accelerator, budget: TimeBudget, lr_scheduler, progress, step: int) -> bool:
    """Count optimizer step `step` against the time budget; True if it is the last one. Whenever the plan moves (made
    when the probe ends, then again after every step), the rest of the LR schedule, the task's step-dependent
    settings and the progress bar are sized to it: at the last step the plan is that step, so the LR is the
    schedule's final one."""
    before, decay_from = budget.planned_steps, budget.decay_from
    out_of_time = agree(accelerator, budget, budget.step_done(step))
    if budget.planned_steps != before or budget.decay_from != decay_from:
        resize_lr_schedule(lr_scheduler, train_cfg, schedule_steps(0, budget), accelerator.num_processes, budget)
    if budget.planned_steps != before:
        if hasattr(task, "set_run_length"):
            task.set_run_length(budget.planned_steps)
        progress.total = budget.planned_steps
        if before is None:
            accelerator.print(budget.describe())
    last = out_of_time or (budget.planned_steps is not None and step >= budget.planned_steps)
    if last:
        accelerator.print(budget.summary(step))
    return last
