"""<stage>/best/ during training (train.eval_every): written atomically, a failed write reported in one line, and
the score to beat read back only from the same run (a resume) measured by the same metric. The evaluations are
stand-ins that return chosen scores, so that which evaluation wins is known."""

import errno
import json
from pathlib import Path

import pytest
from diffusers import AutoencoderKL
from helpers import REPO, run, tiny_config, trained_tiny_vae

from ldm.cli import run_training
from ldm.train import unet as unet_module
from ldm.train.vae import VAETask, train_vae

QUIET = ["--train.sample_every=0", "--train.report_to=none", "--train.checkpointing_steps=3", "--train.eval_every=3"]


def vae_scores(monkeypatch, psnr: list[float], ssim: float = 0.5) -> None:
    """The held-out evaluation gives these PSNRs in turn (then 0: the final evaluation) and a constant SSIM."""
    scores = list(psnr)
    monkeypatch.setattr(VAETask, "evaluate_holdout",
                        lambda self, vae: {"psnr": scores.pop(0) if scores else 0.0, "ssim": ssim, "num_images": 4})


def fail_second_write(monkeypatch, target, name: str) -> None:
    """The second call of target.name (a save into best.tmp) writes half a weights file, then the disk is full."""
    calls, original = [], getattr(target, name)

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            folder = Path(args[1])  # save_pretrained(self, folder), save_pipeline(pipe, folder)
            (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


def assert_failed_write_kept_the_previous_best(status: int, error: str, stage_dir: Path, step: int) -> None:
    best = stage_dir / "best"
    assert status == 1 and "Traceback" not in error
    assert (f"error: could not write the best model {best}: [Errno 28] No space left on device. The checkpoints "
            f"already saved are intact (checkpoint-3, checkpoint-6), and so is the previous best/. Free disk space or "
            f"fix the permissions of {stage_dir}, then continue with --train.resume_from_checkpoint=latest\n") in error
    assert json.loads((best / "metrics.json").read_text())["step"] == step
    assert sorted(p.name for p in stage_dir.iterdir() if p.name.startswith("best")) == ["best"]  # no .tmp, no .old


def test_vae_best_write_that_fails_keeps_the_previous_best_and_is_one_line(tmp_path, monkeypatch, capsys):
    vae_scores(monkeypatch, [1.0, 2.0])  # step 6 beats step 3: its write fails half-way
    fail_second_write(monkeypatch, AutoencoderKL, "save_pretrained")
    status = run_training("vae", ["--config", str(REPO / "configs/tiny.yaml"), "--output_dir", str(tmp_path), *QUIET])
    assert_failed_write_kept_the_previous_best(status, capsys.readouterr().err, tmp_path / "vae", step=3)
    assert AutoencoderKL.from_pretrained(tmp_path / "vae" / "best").config.latent_channels == 4


def vae_run(out: Path, **overrides) -> None:
    run(train_vae, tiny_config(out, **{"vae.train.sample_every": 0, "vae.train.report_to": "none",
                                       "vae.train.checkpointing_steps": 3, "vae.train.eval_every": 3, **overrides}))


def best_summary(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "best" / "metrics.json").read_text())


def test_a_fresh_run_does_not_compete_with_the_best_an_earlier_run_left(tmp_path, monkeypatch):
    (tmp_path / "vae" / "best").mkdir(parents=True)
    (tmp_path / "vae" / "best" / "metrics.json").write_text(json.dumps({"step": 99, "metric": "psnr", "value": 1e9}))
    vae_scores(monkeypatch, [1.0, 2.0])
    vae_run(tmp_path)
    summary = best_summary(tmp_path / "vae")
    assert (summary["step"], summary["metric"], summary["value"]) == (6, "psnr", 2.0)


@pytest.mark.parametrize("metric, best", [("psnr", {"step": 6, "metric": "psnr", "value": 2.0}),
                                          ("ssim", {"step": 9, "metric": "ssim", "value": 0.25})])
def test_a_resumed_run_competes_with_its_best_only_by_the_same_metric(tmp_path, monkeypatch, metric, best):
    """Steps 1-6 keep step 6 (PSNR 2). Resumed to step 9, where PSNR is 1.5 and SSIM 0.25: by PSNR step 6 stays
    the best; by SSIM, the saved PSNR is no score to compare with, and step 9 becomes the best."""
    vae_scores(monkeypatch, [1.0, 2.0])
    vae_run(tmp_path)
    vae_scores(monkeypatch, [1.5], ssim=0.25)
    vae_run(tmp_path, **{"vae.train.max_steps": 9, "vae.train.resume_from_checkpoint": "latest",
                         "vae.eval_metric": metric})
    summary = best_summary(tmp_path / "vae")
    assert {k: summary[k] for k in best} == best


class StandInFeatures:
    metric_prefix = "stand-in-"


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory) -> Path:
    return trained_tiny_vae(tmp_path_factory.mktemp("vae"))


def test_unet_best_is_this_runs_and_a_failed_write_keeps_the_previous_one(vae_path, tmp_path, monkeypatch, capsys):
    """An earlier run left a best/ with FID -1 (unbeatable): this fresh run's step 3 (FID 5) replaces it; step 6
    (FID 3) is better, but its write fails half-way: step 3's best/ stays whole, and the error is one line."""
    import ldm.eval.evaluation
    import ldm.eval.features

    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    scores = [5.0, 3.0]
    monkeypatch.setattr(ldm.eval.features, "load_feature_network", lambda path: StandInFeatures())
    monkeypatch.setattr(ldm.eval.evaluation, "reference_features", lambda *args, **kwargs: {})
    monkeypatch.setattr(ldm.eval.evaluation, "evaluate_pipeline",
                        lambda *args, **kwargs: {"metrics": {"stand-in-FID": scores.pop(0)}, "num_samples": 8})
    (tmp_path / "unet" / "best").mkdir(parents=True)
    (tmp_path / "unet" / "best" / "metrics.json").write_text(json.dumps({"metric": "stand-in-FID", "value": -1.0}))
    fail_second_write(monkeypatch, unet_module, "save_pipeline")
    status = run_training("unet", ["--config", str(REPO / "configs/tiny.yaml"), "--output_dir", str(tmp_path),
                                   f"--denoiser.vae_path={vae_path}", *QUIET])
    assert_failed_write_kept_the_previous_best(status, capsys.readouterr().err, tmp_path / "unet", step=3)
    assert (tmp_path / "unet" / "best" / "model_index.json").is_file()
