"""One time budget for the whole run: `ldm train --config X --train.max_minutes=30` trains both stages and splits
the time between them by measurement (config section `budget`; docs/guide/budgets.md).

1. The autoencoder trains first, within `budget.vae_max_share` of the total, with a warmup-stable-decay LR
   (ldm.train.budget, 6): after the warm-up the LR stays at its peak, since where the stage ends is not known yet.
2. Its held-out score is measured about EVALUATIONS_PER_TENTH times per tenth of the total, at the step time of its
   budget's first plan (vae.train.eval_every replaces that cadence when set): PSNR, or rFID with vae.eval_features,
   both in dB (PSNR is -10·log10 of the MSE, rFID counts as -10·log10 rFID), so that one threshold means the same
   relative error reduction for both.
3. The plateau rule, at the step after each evaluation: once the stage has run a tenth of the total and that last
   tenth holds at least MIN_POINTS scores, the rate is their least-squares slope, in dB per tenth of the total.
   Below `budget.vae_min_gain_db`, the stage ends early (`TimeBudget.end_early`): the LR decays from this step to an
   end at t / (1 - vae_decay_share), within [vae_min_share, vae_max_share] of the total. The decay starts at the
   latest when it would just end at the upper bound.
4. The denoiser gets the rest: the total less the wall-clock time from the start of the command to the end of the
   autoencoder stage (its last evaluation, latent statistics and save included), so that no minute is left unused.
5. `<output_dir>/run_budget.json` holds the split, why it was chosen (the score curve, the rate at the decision) and
   where the run stands, so that the same command run again continues it: the autoencoder from its latest
   checkpoint (whose budget.json holds its time spent, its decision and its evaluation cadence; scores measured
   after that checkpoint are dropped), or, once the autoencoder is finished, the denoiser with the same budget.
   Time counted: what each stage's budget had counted at its latest checkpoint (SIGTERM and Ctrl-C write one) plus
   this process's wall clock; what an interrupted process did after its latest checkpoint is redone, its time not
   counted.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.config import ConfigError, RunConfig, to_dict
from ldm.train import budget as time_budget
from ldm.train.checkpoint import checkpoint_step, resolve_resume_path
from ldm.train.unet import train_unet
from ldm.train.vae import train_vae

RECORD = "run_budget.json"  # in the output folder
EVALUATIONS_PER_TENTH = 5  # held-out evaluations per tenth of the total budget, unless vae.train.eval_every is set
MIN_POINTS = 3  # scores in the last tenth that the rule needs for a slope
MIN_STAGE_MINUTES = 0.1  # the least time a stage may be given: its start-up and the steps its budget times first


@dataclass
class PlateauRule:
    """When the autoencoder stops (3) and where it then ends: `budget`'s keys for a total of `total` seconds."""

    total: float  # seconds of the whole run (budget.max_minutes)
    min_gain_db: float  # the threshold of the rate, dB per tenth of the total (budget.vae_min_gain_db)
    min_share: float  # the stage's least and most share of the total (budget.vae_min_share, vae_max_share)
    max_share: float
    decay_share: float  # share of the stage that its final decay takes (budget.vae_decay_share)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> PlateauRule:
        b = cfg.budget
        return cls(60.0 * b.max_minutes, b.vae_min_gain_db, b.vae_min_share, b.vae_max_share, b.vae_decay_share)

    @property
    def window(self) -> float:
        """A tenth of the total, in seconds: the rate's window and unit."""
        return self.total / 10

    def rate(self, scores: list[tuple[float, float]]) -> float | None:
        """dB per tenth of the total: the least-squares slope of the (seconds, dB) scores of the last tenth before
        the latest one; None before the stage has run a tenth or while that tenth holds fewer than MIN_POINTS."""
        if not scores or scores[-1][0] < self.window:
            return None
        recent = [(t, db) for t, db in scores if t >= scores[-1][0] - self.window]
        if len(recent) < MIN_POINTS:
            return None
        mean_t = sum(t for t, _ in recent) / len(recent)
        mean_db = sum(db for _, db in recent) / len(recent)
        spread = sum((t - mean_t) ** 2 for t, _ in recent)
        if spread == 0:
            return None
        return sum((t - mean_t) * (db - mean_db) for t, db in recent) / spread * self.window

    def latest_decay_start(self) -> float:
        """The stage time at which the final decay must start to end at the upper bound."""
        return self.max_share * self.total * (1 - self.decay_share)

    def end(self, seconds: float) -> float:
        """Where the stage ends when its final decay starts `seconds` into it."""
        return min(max(seconds / (1 - self.decay_share), self.min_share * self.total), self.max_share * self.total)


def score_of(result: dict[str, Any]) -> tuple[str, float, float]:
    """(name, value, dB) of the held-out score the rule follows: rFID when measured (vae.eval_features), else PSNR."""
    rfid = [key for key in result if key.endswith("rFID")]
    if rfid:
        value = result[rfid[0]]
        return rfid[0], value, -10 * math.log10(max(value, 1e-10))
    return "PSNR", result["psnr"], result["psnr"]


def is_main() -> bool:
    """Rank 0 of a launch (torchrun and accelerate set RANK), read before any Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    if is_main():
        print(message, flush=True)


class AutoencoderBudget(time_budget.TimeBudget):
    """The autoencoder stage's budget: the upper bound until the plateau rule decides, a stable LR until then, the
    held-out scores it sees (`observe`) and its decision. The main process decides; `budget.agree` passes the end and
    the decay's first step to the others."""

    def __init__(self, rule: PlateauRule, probe_steps: int, start: float, saved_scores=(), metric: str = "score",
                 on_change=None):
        super().__init__(rule.max_share * rule.total / 60, probe_steps, start=start, stable_lr=True)
        self.rule = rule
        self.metric = metric  # the score's name (score_of)
        self.scores: list[list] = []  # [step, stage seconds, value, dB] of each evaluation
        self.saved_scores = [list(s) for s in saved_scores]  # run_budget.json's, restored by `load`
        self.decision: dict[str, Any] | None = None
        self.checked = 0  # scores the rule has seen
        self.fixed_eval_every: int | None = None  # steps between evaluations, fixed at the first plan
        self.on_change = on_change or (lambda: None)

    @property
    def eval_every(self) -> int:
        """Steps between held-out evaluations (2): 0 until the first plan. Fixed from the step time that all
        processes agreed on, and saved, so that every process and a resumed run evaluate at the same steps."""
        if self.fixed_eval_every is None and self.seconds_per_step is not None:
            every = self.rule.window / EVALUATIONS_PER_TENTH / max(self.seconds_per_step, 1e-9)
            self.fixed_eval_every = max(1, round(every))
        return self.fixed_eval_every or 0

    def observe(self, step: int, result: dict[str, Any]) -> None:
        """A held-out evaluation after step `step` (main process)."""
        name, value, db = score_of(result)
        self.metric = name
        self.scores.append([step, self.elapsed(), value, db])
        self.on_change()

    def step_done(self, step: int) -> bool:
        last = super().step_done(step)
        if self.decay_from is not None or not is_main():
            return last
        why = self._why_stop()
        if why is None:
            return last
        seconds = self.elapsed()
        self.end_early(step, self.rule.end(seconds))
        self.decision = {"step": step, "seconds": seconds, "end_seconds": self.seconds, **why}
        say(f"split: {self.explain()}")
        self.on_change()
        return self.remaining() <= 0

    def _why_stop(self) -> dict[str, Any] | None:
        """The plateau rule after a new score; the upper bound's latest decay start after any step."""
        new, self.checked = len(self.scores) > self.checked, len(self.scores)
        rate = self.rule.rate([(s[1], s[3]) for s in self.scores])
        latest = {"score": self.scores[-1][2] if self.scores else None, "rate_db_per_tenth": rate}
        if new and rate is not None and rate < self.rule.min_gain_db:
            return {"reason": "plateau", **latest}
        if self.elapsed() >= self.rule.latest_decay_start():
            return {"reason": "upper bound", **latest}
        return None

    def explain(self) -> str:
        """Why the stage ends where it does, in one sentence."""
        d, total = self.decision, self.rule.total / 60
        if d is None:
            return "the autoencoder's budget ran out before the plateau rule could measure a rate"
        name = self.metric
        at = f"at {d['seconds'] / 60:.3g} min (step {d['step']})"
        if d["rate_db_per_tenth"] is None:
            rose = f"{at} no rate of the held-out {name} yet"
        else:
            rose = (f"{at} the held-out {name} ({d['score']:.4g} at the last evaluation) rose "
                    f"{d['rate_db_per_tenth']:.3g} dB per tenth of the budget")
        if d["reason"] == "plateau":
            why = f"below budget.vae_min_gain_db={self.rule.min_gain_db:g}"
        else:
            why = f"its final LR decay had to start to end by budget.vae_max_share={self.rule.max_share:g}"
        return (f"{rose}: {why}; the LR decays from there to the stage's end at {d['end_seconds'] / 60:.3g} min "
                f"({d['end_seconds'] / 60 / total:.0%} of {total:.4g} min)")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "decision": self.decision, "eval_every": self.fixed_eval_every}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.decision, self.fixed_eval_every = state.get("decision"), state.get("eval_every")

    def load(self, directory: Path) -> bool:
        """A checkpoint's budget, and the scores measured up to its step (a score is seen by the rule one step
        after its evaluation, so the last of them is still new to it)."""
        if not super().load(directory):
            return False
        step = checkpoint_step(directory)
        self.scores = [s for s in self.saved_scores if s[0] <= step]
        self.checked = sum(s[0] < step for s in self.scores)
        return True


class RunRecord:
    """`<output_dir>/run_budget.json`: the split, why, and where the run stands (5). Written by the main process."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / RECORD
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def write(self) -> None:
        if not is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)


def as_is(cfg: RunConfig) -> bool:
    """Stage 1 trains nothing: a published autoencoder used as it is."""
    return bool(cfg.vae.pretrained) and cfg.vae.finetune == "none"


def check(cfg: RunConfig) -> None:
    """ConfigErrors before any work, for `ldm train` without a stage."""
    b = cfg.budget
    if b.max_minutes is None:
        return
    for section in ("vae", "denoiser"):
        minutes = getattr(cfg, section).train.max_minutes
        if minutes is not None:
            raise ConfigError(f"{section}.train.max_minutes={minutes:g} with budget.max_minutes={b.max_minutes:g}: "
                              "one budget for the run decides each stage's share; drop the stage's budget, or train "
                              "the stages one by one (ldm train vae, then ldm train unet)")
    if cfg.denoiser.vae_path:
        raise ConfigError(f"denoiser.vae_path={cfg.denoiser.vae_path!r}: the denoiser would not use the autoencoder "
                          "this run trains; train the denoiser alone with `ldm train unet`")
    if not as_is(cfg) and cfg.data.holdout_fraction <= 0:
        raise ConfigError("budget.max_minutes: the split follows the autoencoder's score on held-out images, and "
                          "data.holdout_fraction=0 keeps none; set it above 0 (--data.holdout_fraction=0.05)")
    least = min(b.vae_min_share, 1 - b.vae_max_share)
    if least * b.max_minutes < MIN_STAGE_MINUTES:
        raise ConfigError(
            f"budget.max_minutes={b.max_minutes:g} is too small for both stages: the autoencoder gets at least "
            f"{b.vae_min_share * b.max_minutes:.3g} min (vae_min_share={b.vae_min_share:g}) and the denoiser at least "
            f"{(1 - b.vae_max_share) * b.max_minutes:.3g} min (1 - vae_max_share), and a stage needs "
            f"{MIN_STAGE_MINUTES:g} min for its start-up and the steps it times; give at least "
            f"{MIN_STAGE_MINUTES / least:.3g} min")


def describe(cfg: RunConfig) -> str:
    """The plan before any measurement (for --dry_run and the start of the run)."""
    b = cfg.budget
    if b.max_minutes is None:
        return "no budget.max_minutes: the autoencoder, then the denoiser, each by its own train settings"
    return (f"one budget of {b.max_minutes:g} min: the autoencoder trains while its held-out score rises by "
            f"budget.vae_min_gain_db={b.vae_min_gain_db:g} dB or more per tenth of it ({b.max_minutes / 10:.3g} min), "
            f"for {b.vae_min_share * b.max_minutes:.3g} to {b.vae_max_share * b.max_minutes:.3g} min; the denoiser "
            "gets the rest")


def train_run(cfg: RunConfig) -> dict[str, Any]:
    """Both stages of `cfg` within budget.max_minutes (or each by its own settings without it); writes what a
    training script writes, and run_budget.json. Returns the record."""
    from accelerate.state import AcceleratorState

    started = time_budget.clock()
    check(cfg)
    record = RunRecord(cfg.output_dir)
    if record.data.get("unet", {}).get("finished"):
        say(f"{record.path} says this run is finished (pipeline: {record.data['unet'].get('pipeline')}); train "
            "again with another --output_dir")
        return record.data
    resuming, denoiser_started = bool(record.data), "unet" in record.data
    if resuming and record.data.get("max_minutes") != cfg.budget.max_minutes:
        say(f"budget.max_minutes changed from {record.data.get('max_minutes')} to {cfg.budget.max_minutes}: the "
            "time already spent counts against the new total")
    say(("continuing the run in " + str(cfg.output_dir) + ": " if resuming else "") + describe(cfg))
    record.data.update(max_minutes=cfg.budget.max_minutes, rule=to_dict(cfg.budget))
    record.write()
    vae_seconds = train_autoencoder(cfg, record, started, resuming)
    AcceleratorState._reset_state()  # the denoiser's Accelerator may differ (mixed precision); the processes stay
    train_denoiser(cfg, record, vae_seconds, denoiser_started)
    return record.data


def train_autoencoder(cfg: RunConfig, record: RunRecord, started: float, resuming: bool) -> float:
    """Stage 1 (skipped if the record says it is finished): the seconds it took, counted from `started`."""
    entry = record.data.get("vae", {})
    if entry.get("finished"):
        say(f"the autoencoder is trained ({entry['seconds'] / 60:.3g} min): on to the denoiser")
        return entry["seconds"]
    stage_cfg = copy.deepcopy(cfg)
    train_cfg = stage_cfg.vae.train
    if resuming and train_cfg.resume_from_checkpoint is None:
        train_cfg.resume_from_checkpoint = "latest"
    stage = None
    total = cfg.budget.max_minutes
    if total is not None and not as_is(cfg):
        rule = PlateauRule.from_config(cfg)
        train_cfg.max_minutes = rule.max_share * rule.total / 60  # the upper bound, until the rule decides
        stage = AutoencoderBudget(rule, train_cfg.budget_probe_steps, started, entry.get("scores", []),
                                  entry.get("metric") or "score",
                                  on_change=lambda: _write_autoencoder(record, stage, finished=False))
    metrics = train_vae(stage_cfg, stage)
    seconds = (stage.spent_before if stage is not None else 0.0) + time_budget.clock() - started
    _write_autoencoder(record, stage, finished=True, seconds=seconds, final=metrics)
    if total is not None:
        split = (f"split of the {total:g} min budget: autoencoder {seconds / 60:.3g} min ({seconds / 60 / total:.0%}"
                 f"{'' if stage is None else f', {stage.planned_steps} steps'}), denoiser the "
                 f"{total - seconds / 60:.3g} min left")
        why = ("vae.pretrained, used as is" if stage is None else f"{stage.explain()}\n  {curve(stage)}")
        say(f"{split}\n  why: {why}")
    return seconds


def _write_autoencoder(record: RunRecord, stage: AutoencoderBudget | None, finished: bool, **values) -> None:
    entry = {"finished": finished, **values}
    if stage is not None:
        total = stage.rule.total
        entry.update(metric=stage.metric, decision=stage.decision, scores=stage.scores,
                     reason=(stage.decision or {}).get("reason", "budget spent before a decision"),
                     why=stage.explain())
        if "seconds" in values:
            entry.update(share=values["seconds"] / total, steps=stage.planned_steps)
    if "final" in entry:  # the finished autoencoder's held-out scores
        entry["final"] = {k: v for k, v in (entry["final"] or {}).items() if k.startswith("holdout_")}
    record.data["vae"] = entry
    record.write()


def curve(stage: AutoencoderBudget, points: int = 12) -> str:
    """The held-out score by stage minute, at most `points` of the evaluations (the last one always)."""
    scores = stage.scores
    if not scores:
        return "no held-out evaluation"
    n = min(points, len(scores))
    keep = sorted({round(i * (len(scores) - 1) / max(1, n - 1)) for i in range(n)})
    text = ", ".join(f"{scores[i][1] / 60:.3g}: {scores[i][2]:.4g}" for i in keep)
    return (f"held-out {stage.metric} by minute ({len(scores)} evaluations, all in {RECORD}): {text}")


def train_denoiser(cfg: RunConfig, record: RunRecord, vae_seconds: float, started_before: bool) -> None:
    """Stage 2 with what the total leaves (4), continuing its latest checkpoint if an earlier process began it."""
    stage_cfg = copy.deepcopy(cfg)
    train_cfg = stage_cfg.denoiser.train
    total = cfg.budget.max_minutes
    spent_before = 0.0
    if started_before and train_cfg.resume_from_checkpoint is None:
        train_cfg.resume_from_checkpoint = "latest"
        latest = resolve_resume_path("latest", Path(cfg.output_dir) / "unet" / "checkpoints")
        if latest is not None and (latest / time_budget.BUDGET_FILE).is_file():
            spent_before = json.loads((latest / time_budget.BUDGET_FILE).read_text())["elapsed_seconds"]
    entry: dict[str, Any] = {"finished": False}
    if total is not None:
        left = 60 * total - vae_seconds
        if left < 60 * MIN_STAGE_MINUTES:
            raise ConfigError(f"the autoencoder stage took {vae_seconds / 60:.3g} of the {total:g} min, leaving "
                              f"{max(left, 0):.3g} s for the denoiser: run the same command with a larger "
                              "--train.max_minutes to train the denoiser (the autoencoder is kept), or lower "
                              "budget.vae_max_share")
        train_cfg.max_minutes = left / 60
        entry["budget_seconds"] = left
    record.data["unet"] = entry
    record.write()
    started = time_budget.clock()
    metrics = train_unet(stage_cfg)
    seconds = spent_before + time_budget.clock() - started
    entry.update(finished=True, seconds=seconds, pipeline=(metrics or {}).get("pipeline"))
    if total is not None:
        used = vae_seconds + seconds
        record.data.update(used_seconds=used, used_share=used / (60 * total))
        say(f"one budget: {used / 60:.3g} of {total:g} min used: autoencoder {vae_seconds / 60:.3g} min, denoiser "
            f"{seconds / 60:.3g} min (its final save included); the split and the score curve: {record.path}")
    record.write()
