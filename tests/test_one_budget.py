"""One time budget for both stages (`ldm train --train.max_minutes=M`, ldm.train.run_budget): the plateau rule on
synthetic score curves, the autoencoder's warmup-stable-decay end and its resume against a fake clock, the split
arithmetic and the run's resume with stand-in stages, errors before work, and one tiny run of the command."""

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState
from helpers import REPO

from ldm.cli import main
from ldm.config import load_config
from ldm.train import budget, run_budget
from ldm.train.run_budget import AutoencoderBudget, PlateauRule, score_of

# 600 s in all (a tenth: 60 s), the defaults' threshold, bounds and decay share.
RULE = {"total": 600.0, "min_gain_db": 0.5, "min_share": 0.15, "max_share": 0.75, "decay_share": 0.2}


class FakeClock:
    """Each reading is `seconds` later than the one before; a resumed process's clock starts at its `first_step`."""

    def __init__(self, seconds=1.0, first_step=1):
        self.now, self.readings, self.seconds, self.first_step = 0.0, 0, seconds, first_step

    def __call__(self) -> float:
        if self.readings:
            self.now += self.seconds
        self.readings += 1
        return self.now


class Spine:
    """What count_step needs of the task, the accelerator (one process) and the progress bar."""

    num_processes, total = 1, None

    def print(self, message):
        pass

    def set_run_length(self, total_steps):
        pass


def train(b: AutoencoderBudget, curve, first=1, last=None, stop_after=None):
    """Steps under `b` as the spine takes them: an optimizer step and its LR schedule's (a cosine decay, 2 warm-up
    steps), count_step, then the held-out evaluation `curve(stage seconds)` when `b` asks for one; `stop_after`:
    save the budget (budget.json, read back by `load`) after that step's count, as a checkpoint there would.
    Returns the LR after each step from `first` on and the last step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    train_cfg = SimpleNamespace(lr_scheduler="cosine", lr_warmup_steps=2)
    schedule = budget.lr_lambdas(train_cfg, optimizer, budget.schedule_steps(0, b), 1)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    lr_scheduler.last_epoch = first - 1  # a resumed process: the schedule's position, as its checkpoint restores it
    budget.resize_lr_schedule(lr_scheduler, train_cfg, budget.schedule_steps(0, b), 1, b)
    lrs = []
    for step in range(first, 100_000):
        optimizer.step()
        lr_scheduler.step()
        end = budget.count_step(Spine(), train_cfg, Spine(), b, lr_scheduler, Spine(), step)
        lrs.append(optimizer.param_groups[0]["lr"])
        if stop_after is not None and step == stop_after:
            return lrs, step
        if b.eval_every and (step % b.eval_every == 0 or end):
            b.observe(step, {"psnr": curve(b.elapsed())})
        if end or step == last:
            return lrs, step
    raise AssertionError("the budget never ended the stage")


def test_the_rate_is_the_slope_over_the_last_tenth_in_db_per_tenth():
    rule = PlateauRule(**RULE)
    rising = [(t, 20 + 0.05 * t) for t in range(0, 130, 10)]  # 0.05 dB/s = 3 dB per 60 s
    assert rule.rate(rising) == pytest.approx(3.0)
    assert rule.rate(rising[:6]) is None  # 50 s: the stage has not run a tenth yet
    assert rule.rate([(0, 20), (70, 21), (100, 23)]) is None  # two scores in the last tenth
    bent = [(t, 20 + 0.05 * min(t, 60)) for t in range(0, 130, 10)]  # flat from 60 s on
    assert rule.rate(bent) == pytest.approx(0.0, abs=1e-9)
    assert 0 < rule.rate(bent[:9]) < 3.0  # 20-80 s: rising, then flat
    # rFID counts in dB as PSNR does: halving it is 3 dB, as halving the MSE is.
    assert score_of({"psnr": 25.0, "classifier-rFID": 10.0}) == ("classifier-rFID", 10.0, -10.0)
    assert score_of({"psnr": 25.0, "rFID": 5.0})[2] - score_of({"psnr": 25.0, "rFID": 10.0})[2] == pytest.approx(
        10 * math.log10(2))
    assert score_of({"psnr": 25.0, "ssim": 0.9}) == ("PSNR", 25.0, 25.0)


@pytest.mark.parametrize("case, curve, reason, end", [
    # 30 - 10 e^(-t/60): 10 e^(-t/60) dB per tenth at t, under 0.5 dB after 180 s; the slope over the last tenth
    # lags by about half of it, so the rule fires between 180 and 240 s; the stage ends at t / 0.8.
    ("levels off", lambda t: 30 - 10 * math.exp(-t / 60), "plateau", None),
    # 1 dB per tenth all along: the decay starts at 0.75 * 0.8 of the total, so as to end at the upper bound.
    ("keeps rising", lambda t: 20 + t / 60, "upper bound", 450.0),
    # Flat from the start: the rule fires as soon as it can measure (a tenth in), and the lower bound holds.
    ("flat", lambda t: 25.0, "plateau", 90.0),
])
def test_the_autoencoder_ends_after_a_final_decay_where_the_rule_says(monkeypatch, case, curve, reason, end):
    """1 s per step, 600 s in all: the LR stays at its peak after the warm-up until the decision, then decays to 0 at
    the last step, which comes within one step of the end the decision set; evaluations come every 12 steps (five
    per tenth of the total)."""
    monkeypatch.setattr(budget, "clock", FakeClock())
    b = AutoencoderBudget(PlateauRule(**RULE), probe_steps=4, start=budget.clock())
    lrs, last = train(b, curve)
    d = b.decision
    assert b.eval_every == 12 and d["reason"] == reason
    if case == "levels off":
        assert 180 <= d["seconds"] <= 240 and d["rate_db_per_tenth"] < 0.5
        end = d["seconds"] / 0.8
    assert d["end_seconds"] == pytest.approx(end) and abs(b.elapsed() - end) <= 1.0
    assert lrs[0] == 0.5 and lrs[1:d["step"]] == [1.0] * (d["step"] - 1)  # 2 warm-up steps, stable to the decision
    decay = lrs[d["step"] - 1:]
    assert all(x > y for x, y in itertools.pairwise(decay)) and decay[-1] == pytest.approx(0.0, abs=1e-12)
    assert b.planned_steps == last and [s[0] for s in b.scores][:2] == [12, 24]


@pytest.mark.parametrize("interrupted_at", [30, 216, 240])
def test_a_resumed_autoencoder_decides_and_ends_as_one_that_never_stopped(monkeypatch, tmp_path, interrupted_at):
    """The rule fires at step 217, on the score measured after step 216. Saved at step 30, at step 216 (its
    checkpoint comes before that evaluation, whose score only the record holds) or at 240 (after the decision), and
    resumed by a new process with the scores of the record (also those measured after the checkpoint, which it
    drops): the same decision at 217, the same LRs, the same last step (271)."""
    curve = lambda t: 30 - 10 * math.exp(-t / 60)
    monkeypatch.setattr(budget, "clock", FakeClock())
    straight = AutoencoderBudget(PlateauRule(**RULE), probe_steps=4, start=budget.clock())
    lrs, last = train(straight, curve)
    assert straight.decision["step"] == 217 and last == 271
    monkeypatch.setattr(budget, "clock", FakeClock())
    interrupted = AutoencoderBudget(PlateauRule(**RULE), probe_steps=4, start=budget.clock())
    train(interrupted, curve, stop_after=interrupted_at)
    checkpoint = tmp_path / f"checkpoint-{interrupted_at}"
    checkpoint.mkdir()
    interrupted.save(checkpoint)
    monkeypatch.setattr(budget, "clock", FakeClock(first_step=interrupted_at + 1))
    resumed = AutoencoderBudget(PlateauRule(**RULE), probe_steps=4, start=budget.clock(),
                                saved_scores=straight.scores, metric="PSNR")
    assert resumed.load(checkpoint) and resumed.replan(interrupted_at) is None
    assert all(s[0] <= interrupted_at for s in resumed.scores)
    resumed_lrs, resumed_last = train(resumed, curve, first=interrupted_at + 1)
    assert resumed.decision == straight.decision and resumed_last == last
    assert resumed_lrs == pytest.approx(lrs[interrupted_at:], abs=1e-12)
    assert resumed.scores == straight.scores


class StandIns:
    """Stages that only move a settable clock: the autoencoder takes `vae_seconds` (start-up, training, save), the
    denoiser its whole budget and 2 s to save; `crash_denoiser_after` seconds: it stops there instead, leaving a
    checkpoint whose budget.json counts them."""

    def __init__(self, monkeypatch, vae_seconds=150.0, crash_denoiser_after=None):
        self.now, self.vae_seconds, self.crash = 0.0, vae_seconds, crash_denoiser_after
        self.calls = []
        monkeypatch.setattr(budget, "clock", lambda: self.now)
        monkeypatch.setattr(run_budget, "train_vae", self.vae)
        monkeypatch.setattr(run_budget, "train_unet", self.unet)

    def vae(self, cfg, stage):
        self.calls.append(("vae", cfg.vae.train.max_minutes, cfg.vae.train.resume_from_checkpoint, stage))
        self.now += self.vae_seconds
        return {"holdout_psnr": 30.0}

    def unet(self, cfg):
        t = cfg.denoiser.train
        self.calls.append(("unet", t.max_minutes, t.resume_from_checkpoint))
        if self.crash is not None:
            self.now += self.crash
            saved = Path(cfg.output_dir) / "unet" / "checkpoints" / "checkpoint-40"
            saved.mkdir(parents=True)
            (saved / budget.BUDGET_FILE).write_text(json.dumps({"elapsed_seconds": self.crash}))
            raise KeyboardInterrupt
        self.now += 60 * t.max_minutes + 2.0
        return {"pipeline": f"{cfg.output_dir}/pipeline"}


def test_the_denoiser_gets_what_the_clock_leaves_and_a_rerun_continues(monkeypatch, tmp_path):
    """10 minutes: the autoencoder stage takes 150 s by the wall clock, so the denoiser gets 450 s; interrupted
    after 100 s of them, the same command continues the denoiser from its checkpoint with the same 450 s, counting
    the 100 s spent, and a third run finds the run finished."""
    cfg = load_config(REPO / "configs/tiny.yaml", {"output_dir": str(tmp_path), "budget.max_minutes": 10})
    stages = StandIns(monkeypatch, crash_denoiser_after=100.0)
    with pytest.raises(KeyboardInterrupt):
        run_budget.train_run(cfg)
    (_, vae_minutes, vae_resume, stage), (_, unet_minutes, unet_resume) = stages.calls
    assert vae_minutes == 7.5 and isinstance(stage, AutoencoderBudget) and stage.seconds == 450.0  # upper bound
    assert vae_resume is None and unet_resume is None and unet_minutes == pytest.approx(7.5)
    record = json.loads((tmp_path / run_budget.RECORD).read_text())
    assert record["vae"]["finished"] and record["vae"]["seconds"] == 150.0 and record["vae"]["share"] == 0.25
    assert record["unet"] == {"finished": False, "budget_seconds": 450.0}

    stages = StandIns(monkeypatch)
    stages.now = 1000.0  # a new process: its clock reads anything
    record = run_budget.train_run(cfg)
    assert stages.calls == [("unet", pytest.approx(7.5), "latest")]  # the autoencoder is not trained again
    assert record["unet"]["seconds"] == 100.0 + 452.0 and record["used_seconds"] == 150.0 + 552.0
    assert run_budget.train_run(cfg)["unet"]["finished"] and len(stages.calls) == 1


def test_a_rerun_continues_an_unfinished_autoencoder_from_its_checkpoint(monkeypatch, tmp_path):
    cfg = load_config(REPO / "configs/tiny.yaml", {"output_dir": str(tmp_path), "budget.max_minutes": 10})
    (tmp_path / run_budget.RECORD).write_text(json.dumps({"max_minutes": 10, "vae": {"finished": False}}))
    stages = StandIns(monkeypatch)
    run_budget.train_run(cfg)
    assert stages.calls[0][2] == "latest" and stages.calls[1][2] is None


@pytest.mark.parametrize("args, message", [
    (["--data.holdout_fraction=0"], "data.holdout_fraction=0 keeps none"),
    (["--train.max_minutes=0.5"], "budget.max_minutes=0.5 is too small for both stages"),
    (["--vae.train.max_minutes=3"], "vae.train.max_minutes=3 with budget.max_minutes=30"),
    (["--denoiser.vae_path=elsewhere"], "the denoiser would not use the autoencoder"),
    (["--model.layers_per_block=2"], "name the one you mean: --vae.model.layers_per_block or --denoiser"),
    (["--budget.vae_max_share=1"], "need 0 < min <= max < 1"),
    (["--budget.vae_decay_share=1"], "budget.vae_decay_share: must be in [0, 1)"),
])
def test_bad_input_is_a_clear_error_before_any_work(tmp_path, capsys, args, message):
    argv = ["train", "--config", str(REPO / "configs/tiny.yaml"), "--output_dir", str(tmp_path / "run"),
            "--train.max_minutes=30", *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_one_command_trains_both_stages_within_the_budget(monkeypatch, tmp_path, capsys):
    """`ldm train` on configs/tiny.yaml with 1 minute of a clock that moves 2 s per reading: the rule (set to fire
    at once) decides a tenth in, the autoencoder ends at 15%, the denoiser gets the rest; both are saved, the
    record holds the split and its curve, and the minutes used are the budget's within a step or two."""
    monkeypatch.setattr(budget, "clock", FakeClock(seconds=2.0))
    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / "run"
    argv = ["train", "--config", str(REPO / "configs/tiny.yaml"), "--output_dir", str(out), "--train.max_minutes=1",
            "--train.budget_probe_steps=3", "--budget.vae_min_gain_db=1000", "--train.report_to=none",
            "--train.sample_every=0", "--train.checkpointing_steps=0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "split of the 1 min budget: autoencoder" in printed and "below budget.vae_min_gain_db=1000" in printed
    record = json.loads((out / run_budget.RECORD).read_text())
    vae, unet = record["vae"], record["unet"]
    curve = next(line for line in printed.splitlines() if "held-out PSNR by minute" in line)
    assert curve.count(": ") == 1 + min(12, len(vae["scores"]))  # every evaluation, or 12 of them
    assert vae["reason"] == "plateau" and vae["decision"]["seconds"] >= 6.0 and len(vae["scores"]) >= 3
    end = max(vae["decision"]["seconds"] / 0.8, 0.15 * 60)
    assert vae["decision"]["end_seconds"] == end and end <= vae["seconds"] <= end + 2 * 2.0
    assert unet["finished"] and unet["budget_seconds"] == 60.0 - vae["seconds"]
    assert 60.0 - 2.0 <= record["used_seconds"] <= 60.0 + 2 * 2.0
    assert (out / "vae" / "model" / "config.json").is_file() and (out / "pipeline" / "model_index.json").is_file()
