"""Wall-clock budgets (train.max_minutes) against a fake clock: the plan, the stop, the final save, the resume."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from helpers import assert_same_checkpoint, run, tiny_config

from ldm.config import ConfigError
from ldm.train import budget
from ldm.train.budget import TimeBudget
from ldm.train.vae import train_vae


class FakeClock:
    """Each reading is one step later: `step_seconds(n)` seconds after the reading that ends step n (reading 0 is
    the start). A resumed process's clock starts anew at its `first_step`."""

    def __init__(self, step_seconds=lambda n: 1.0, first_step=1):
        self.readings, self.now, self.step_seconds, self.first_step = 0, 0.0, step_seconds, first_step

    def __call__(self) -> float:
        if self.readings:
            self.now += self.step_seconds(self.first_step - 1 + self.readings)
        self.readings += 1
        return self.now


class Spine:
    """What count_step needs of the task, the accelerator (one process) and the progress bar, recorded."""

    def __init__(self):
        self.num_processes, self.total, self.run_length, self.printed = 1, None, None, []

    def print(self, message):
        self.printed.append(message)

    def set_run_length(self, total_steps):
        self.run_length = total_steps


def simulate(b: TimeBudget):
    """Steps of nothing under budget `b`, as the spine takes them: an optimizer step, its cosine LR schedule's step
    (2 warm-up steps, sized to the plan once there is one), count_step. Returns the last step, the LR after each
    step and the spine."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    train_cfg = SimpleNamespace(lr_scheduler="cosine", lr_warmup_steps=2)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=2,
                                 num_training_steps=budget.schedule_steps(0, b))
    spine, lrs = Spine(), []
    for step in range(1, 10_000):
        optimizer.step()
        lr_scheduler.step()
        last = budget.count_step(spine, train_cfg, spine, b, lr_scheduler, spine, step)
        lrs.append(optimizer.param_groups[0]["lr"])
        if last:
            return step, lrs, spine
    raise AssertionError("the budget never ended the run")


def test_probe_fixes_the_step_count_and_the_budget_ends_the_run(monkeypatch):
    monkeypatch.setattr(budget, "clock", FakeClock())
    b = TimeBudget(max_minutes=0.5, probe_steps=4)  # 30 s at 1 s per step
    stops = [b.step_done(step) for step in range(1, 6)]
    # Step 1 is not timed; steps 2-5 are: 1 s each, 25 s left -> 25 more steps.
    assert b.seconds_per_step == 1.0 and b.planned_steps == 30
    assert not any(stops)
    assert [b.step_done(step) for step in range(6, 31)] == [False] * 24 + [True]
    state = b.state_dict()
    assert state == {"max_minutes": 0.5, "planned_steps": 30, "seconds_per_step": 1.0, "elapsed_seconds": 30.0,
                     "recent_step_seconds": [1.0] * 4}


def test_budget_too_small_for_the_probe_stops_at_once(monkeypatch):
    monkeypatch.setattr(budget, "clock", FakeClock(lambda n: 10.0))
    b = TimeBudget(max_minutes=0.25, probe_steps=20)
    assert [b.step_done(step) for step in (1, 2)] == [False, True]  # 10 s, 20 s >= 15 s
    assert b.planned_steps == 2 and b.seconds_per_step is None  # the run ends here: the LR schedule too


STEP_TIMES = {
    # The probe (steps 2-5) runs at 2 s per step, the rest at 1 s: a plan fixed by the probe ends at 35 of 60 s.
    "faster": lambda n: 2.0 if n <= 5 else 1.0,
    # From step 20 on, 2 s per step: a plan fixed by the probe runs out of time 20 steps before its LR ends.
    "slower": lambda n: 1.0 if n < 20 else 2.0,
    # Every 10th step carries 9 s more (a checkpoint, an evaluation).
    "long steps": lambda n: 10.0 if n % 10 == 0 else 1.0,
}


@pytest.mark.parametrize("case", STEP_TIMES)
def test_budget_ends_on_time_with_the_lr_at_its_end_when_step_times_change(monkeypatch, case):
    """A 60 s budget ends within one step or 2% of 60 s, whichever is larger, and the LR (cosine) reaches 0 at the
    last step, with the progress bar's total and the task's run length on that step too."""
    step_seconds = STEP_TIMES[case]
    monkeypatch.setattr(budget, "clock", FakeClock(step_seconds))
    b = TimeBudget(max_minutes=1.0, probe_steps=4)
    last, lrs, spine = simulate(b)
    assert abs(b.elapsed() - 60.0) <= max(step_seconds(last), 0.02 * 60.0)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and max(lrs) == pytest.approx(1.0, abs=0.05)
    assert b.planned_steps == spine.total == spine.run_length == last
    assert spine.printed[0].startswith("time budget 1 min: ") and f"used by {last} steps" in spine.printed[-1]


@pytest.mark.parametrize("interrupted_at", [3, 12, 24])
def test_resumed_budget_plans_as_one_that_never_stopped(monkeypatch, tmp_path, interrupted_at):
    """Steps get faster at step 20 (2 s -> 1 s). A budget saved at step 3 (inside the probe), 12 or 24 and resumed
    by a new process makes the same plan after every step as one that ran through, and ends on the same step."""
    step_seconds = lambda n: 2.0 if n < 20 else 1.0

    def plans(b: TimeBudget, first: int, last: int | None = None) -> list[tuple[int | None, bool]]:
        """The plan and the stop decision after each step from `first` on, to step `last` or the budget's end."""
        seen = []
        for step in range(first, 1000 if last is None else last + 1):
            seen.append((b.step_done(step), b.planned_steps))
            if seen[-1][0]:
                break
        return seen

    monkeypatch.setattr(budget, "clock", FakeClock(step_seconds))
    straight = plans(TimeBudget(max_minutes=1.0, probe_steps=4), 1)
    assert straight[-1] == (True, 41)  # 38 s for steps 1-19, 22 steps of 1 s: it ends on time, at step 41
    monkeypatch.setattr(budget, "clock", FakeClock(step_seconds))
    interrupted = TimeBudget(max_minutes=1.0, probe_steps=4)
    plans(interrupted, 1, interrupted_at)
    interrupted.save(tmp_path)
    monkeypatch.setattr(budget, "clock", FakeClock(step_seconds, first_step=interrupted_at + 1))
    resumed = TimeBudget(max_minutes=1.0, probe_steps=4)
    assert resumed.load(tmp_path) and resumed.replan(interrupted_at) is None
    assert plans(resumed, interrupted_at + 1) == straight[interrupted_at:]


def test_resumed_budget_continues_the_plan_and_the_spent_time(monkeypatch, tmp_path):
    monkeypatch.setattr(budget, "clock", FakeClock())
    b = TimeBudget(max_minutes=0.5, probe_steps=4)
    for step in range(1, 11):
        b.step_done(step)
    b.save(tmp_path)
    monkeypatch.setattr(budget, "clock", FakeClock())  # a new process: its clock starts anew
    resumed = TimeBudget(max_minutes=0.5, probe_steps=4)
    assert resumed.load(tmp_path) and resumed.planned_steps == 30 and resumed.elapsed() == 10.0
    assert [resumed.step_done(step) for step in range(11, 31)] == [False] * 19 + [True]
    assert not TimeBudget(1.0, 4).load(tmp_path / "no-budget")


@pytest.mark.parametrize("minutes, planned", [(1.0, 60), (0.25, 15), (0.1, 10), (0.5, 30)])
def test_resumed_budget_with_another_length_plans_again_from_the_time_left(monkeypatch, tmp_path, minutes, planned):
    """Saved at step 10 of a 30 s plan (1 s per step, 10 s spent): resumed with 60 s, 50 s are left -> 50 more
    steps; with 15 s, 5 more; with 6 s, none. The same budget keeps its plan and says nothing."""
    monkeypatch.setattr(budget, "clock", FakeClock())
    b = TimeBudget(max_minutes=0.5, probe_steps=4)
    for step in range(1, 11):
        b.step_done(step)
    b.save(tmp_path)
    resumed = TimeBudget(max_minutes=minutes, probe_steps=4)
    assert resumed.load(tmp_path)
    message = resumed.replan(10)
    assert resumed.planned_steps == planned and resumed.elapsed() == 10.0
    if minutes == 0.5:
        assert message is None
    else:
        assert f"train.max_minutes changed from 0.5 to {minutes:.4g} on resume" in message
        assert f"re-planned to {planned} steps (was 30)" in message and "0.1667 min spent" in message


BUDGET = {"vae.train.max_minutes": 0.25, "vae.train.budget_probe_steps": 3, "vae.train.checkpointing_steps": 5,
          "vae.train.sample_every": 0, "vae.train.report_to": "none",
          "vae.train.max_steps": 3,  # a budget replaces max_steps: the runs below plan and take more
          # The discriminator starts half-way through the planned steps.
          "vae.loss.disc_weight": 0.5, "vae.loss.disc_start": 0.5, "vae.loss.disc_layers": 1}


def checkpoints(out):
    return sorted(p.name for p in (out / "vae" / "checkpoints").iterdir())


def final_lr(checkpoint_dir) -> float:
    return torch.load(checkpoint_dir / "optimizer.bin", weights_only=True)["param_groups"][0]["lr"]


def test_run_with_budget_plans_its_steps_and_saves(tmp_path, monkeypatch):
    """1 s per step, 15 s: the probe (steps 2-4) plans 15 steps, the cosine LR ends at 0 on step 15, the
    discriminator trains from step 8 on, and the last step is checkpointed and the model saved."""
    monkeypatch.setattr(budget, "clock", FakeClock())
    run(train_vae, tiny_config(tmp_path, **BUDGET))
    assert checkpoints(tmp_path) == ["checkpoint-10", "checkpoint-15", "checkpoint-5"]  # every 5 steps, the last
    last = tmp_path / "vae" / "checkpoints" / "checkpoint-15"
    assert (last / budget.BUDGET_FILE).is_file()
    assert final_lr(last) == pytest.approx(0.0, abs=1e-12)
    assert final_lr(tmp_path / "vae" / "checkpoints" / "checkpoint-10") > 0
    # The discriminator (the second parameter group) has AdamW state once it has trained: at step 15, not at 5.
    for step, trained in ((5, False), (15, True)):
        optimizer = torch.load(last.parent / f"checkpoint-{step}" / "optimizer.bin", weights_only=True)
        assert (set(optimizer["param_groups"][1]["params"]) <= set(optimizer["state"])) == trained
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae" / "model")
    assert vae.config.scaling_factor != 1.0


def test_resumed_budget_run_with_faster_steps_ends_on_time_and_exactly(tmp_path, monkeypatch):
    """Steps take 1 s to step 6, then 0.5 s: the plan made by the probe (15 steps) grows to 24, the run ends on time
    at step 24 (15 s) with the cosine LR at 0, and a run interrupted after step 15 and resumed ends bitwise equal to
    it: the re-planning continues from the checkpoint's recent step times."""
    step_seconds = lambda n: 1.0 if n <= 6 else 0.5
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    monkeypatch.setattr(budget, "clock", FakeClock(step_seconds))
    run(train_vae, tiny_config(straight, **BUDGET))
    assert checkpoints(straight) == ["checkpoint-15", "checkpoint-20", "checkpoint-24"]  # the newest 3 are kept
    last = straight / "vae" / "checkpoints" / "checkpoint-24"
    state = json.loads((last / budget.BUDGET_FILE).read_text())
    assert state["planned_steps"] == 24 and state["elapsed_seconds"] == 15.0
    assert final_lr(last) == pytest.approx(0.0, abs=1e-12)
    shutil.copytree(straight, resumed)  # as a crash after step 15 leaves it
    for name in ("checkpoints/checkpoint-20", "checkpoints/checkpoint-24", "model"):
        shutil.rmtree(resumed / "vae" / name)
    monkeypatch.setattr(budget, "clock", FakeClock(step_seconds, first_step=16))
    metrics = run(train_vae, tiny_config(resumed, **BUDGET, **{"vae.train.resume_from_checkpoint": "latest"}))
    assert metrics["start_step"] == 15
    assert checkpoints(resumed) == checkpoints(straight)
    assert_same_checkpoint(last, resumed / "vae" / "checkpoints" / "checkpoint-24")


def test_finished_budget_run_resumed_with_a_longer_budget_trains_the_new_plan(tmp_path, monkeypatch, capsys):
    """A 15 s run planned and took 15 steps; resumed with 30 s, the 15 s left hold 15 more steps: it trains to step
    30, with the cosine LR stretched to end at 0 there, says so, and writes the model again."""
    monkeypatch.setattr(budget, "clock", FakeClock())
    run(train_vae, tiny_config(tmp_path, **BUDGET))
    monkeypatch.setattr(budget, "clock", FakeClock())
    metrics = run(train_vae, tiny_config(tmp_path, **{**BUDGET, "vae.train.max_minutes": 0.5,
                                                      "vae.train.resume_from_checkpoint": "latest"}))
    assert "train.max_minutes changed from 0.25 to 0.5 on resume" in capsys.readouterr().out
    assert metrics["start_step"] == 15
    assert checkpoints(tmp_path) == ["checkpoint-20", "checkpoint-25", "checkpoint-30"]  # the newest 3 are kept
    last = tmp_path / "vae" / "checkpoints" / "checkpoint-30"
    assert json.loads((last / budget.BUDGET_FILE).read_text())["planned_steps"] == 30
    assert final_lr(last) == pytest.approx(0.0, abs=1e-12) and final_lr(last.parent / "checkpoint-25") > 0


@pytest.mark.parametrize("override, message", [
    ({"vae.train.max_minutes": 0}, "vae.train.max_minutes: must be positive"),
    ({"denoiser.train.budget_probe_steps": 0}, "denoiser.train.budget_probe_steps: must be positive"),
    ({"vae.loss.disc_start": -0.5}, "vae.loss.disc_start: must be >= 0"),
])
def test_bad_budget_settings_are_clear_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **override)
