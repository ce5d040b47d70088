"""Wall-clock budgets (train.max_minutes) against a fake clock: the plan, the stop, the final save, the resume."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import assert_same_checkpoint, run, tiny_config

from ldm.config import ConfigError
from ldm.train import budget
from ldm.train.budget import TimeBudget
from ldm.train.vae import train_vae


class FakeClock:
    """Each reading is one step later: `step_seconds(n)` seconds after the n-th reading (reading 0 is the start)."""

    def __init__(self, step_seconds=lambda n: 1.0):
        self.readings, self.now, self.step_seconds = 0, 0.0, step_seconds

    def __call__(self) -> float:
        if self.readings:
            self.now += self.step_seconds(self.readings)
        self.readings += 1
        return self.now


def test_probe_fixes_the_step_count_and_the_budget_ends_the_run(monkeypatch):
    monkeypatch.setattr(budget, "clock", FakeClock())
    b = TimeBudget(max_minutes=0.5, probe_steps=4)  # 30 s at 1 s per step
    stops = [b.step_done(step) for step in range(1, 6)]
    # Step 1 is not timed; steps 2-5 are: 1 s each, 25 s left -> 25 more steps.
    assert b.seconds_per_step == 1.0 and b.planned_steps == 30
    assert not any(stops)
    assert [b.step_done(step) for step in range(6, 31)] == [False] * 24 + [True]
    state = b.state_dict()
    assert state == {"max_minutes": 0.5, "planned_steps": 30, "seconds_per_step": 1.0, "elapsed_seconds": 30.0}


def test_budget_too_small_for_the_probe_stops_at_once(monkeypatch):
    monkeypatch.setattr(budget, "clock", FakeClock(lambda n: 10.0))
    b = TimeBudget(max_minutes=0.25, probe_steps=20)
    assert [b.step_done(step) for step in (1, 2)] == [False, True]  # 10 s, 20 s >= 15 s
    assert b.planned_steps is None


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


def test_run_stops_within_one_step_of_its_budget_when_steps_slow_down(tmp_path, monkeypatch):
    """Steps take 1 s during the probe, then 3 s: the plan (15 steps) cannot be kept and the run stops after
    step 8, the first to end at or past 15 s, with a checkpoint of that step and a usable model."""
    monkeypatch.setattr(budget, "clock", FakeClock(lambda n: 1.0 if n <= 4 else 3.0))
    run(train_vae, tiny_config(tmp_path, **BUDGET))
    assert checkpoints(tmp_path) == ["checkpoint-5", "checkpoint-8"]
    state = json.loads((tmp_path / "vae" / "checkpoints" / "checkpoint-8" / budget.BUDGET_FILE).read_text())
    assert state["planned_steps"] == 15 and state["elapsed_seconds"] == 16.0
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae" / "model")
    with torch.no_grad():
        out = vae(torch.zeros(1, 1, 16, 16)).sample
    assert out.shape == (1, 1, 16, 16) and torch.isfinite(out).all()


def test_resumed_budget_run_finishes_the_same_schedule(tmp_path, monkeypatch):
    """A budget run interrupted after step 10 and resumed ends bitwise equal to one that ran through: the resumed
    run keeps the saved plan (15 steps) and the time already spent."""
    monkeypatch.setattr(budget, "clock", FakeClock())
    run(train_vae, tiny_config(tmp_path / "straight", **BUDGET))
    monkeypatch.setattr(budget, "clock", FakeClock())
    run(train_vae, tiny_config(tmp_path / "resumed", **BUDGET))
    shutil.rmtree(tmp_path / "resumed" / "vae" / "checkpoints" / "checkpoint-15")
    shutil.rmtree(tmp_path / "resumed" / "vae" / "model")
    monkeypatch.setattr(budget, "clock", FakeClock())
    run(train_vae, tiny_config(tmp_path / "resumed", **BUDGET, **{"vae.train.resume_from_checkpoint": "latest"}))
    assert checkpoints(tmp_path / "resumed") == ["checkpoint-10", "checkpoint-15", "checkpoint-5"]
    assert_same_checkpoint(tmp_path / "straight" / "vae" / "checkpoints" / "checkpoint-15",
                           tmp_path / "resumed" / "vae" / "checkpoints" / "checkpoint-15")


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
