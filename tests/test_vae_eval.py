"""Held-out evaluation during autoencoder training: eval/* logs, vae/best/ from the weights being trained (EMA when
on), and no effect on the training itself."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import run, tiny_config
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ldm.config import ConfigError
from ldm.train.vae import train_vae

QUIET = {"vae.train.sample_every": 0, "vae.train.max_steps": 6}


def test_best_autoencoder_is_the_best_evaluated_ema_weights(tmp_path):
    run(train_vae, tiny_config(tmp_path, **QUIET, **{"vae.train.eval_every": 3, "vae.train.use_ema": True,
                                                     "vae.train.ema_decay": 0.9}))
    summary = json.loads((tmp_path / "vae" / "best" / "metrics.json").read_text())
    events = EventAccumulator(str(tmp_path / "vae" / "logs" / "vae"), size_guidance={"scalars": 0})
    events.Reload()
    psnr = {e.step: e.value for e in events.Scalars("eval/psnr")}
    assert sorted(psnr) == [3, 6] and [e.step for e in events.Scalars("eval/ssim")] == [3, 6]
    assert summary["metric"] == "psnr" and summary["step"] == max(psnr, key=psnr.get)
    assert summary["value"] == pytest.approx(psnr[summary["step"]], rel=1e-6)
    # The saved weights are the EMA weights of that step (as checkpointed), not the raw training weights.
    best = load_file(tmp_path / "vae" / "best" / "diffusion_pytorch_model.safetensors")
    checkpoint = tmp_path / "vae" / "checkpoints" / f"checkpoint-{summary['step']}"
    ema, raw = load_file(checkpoint / "ema.safetensors"), load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(best[k], ema[f"vae.{k}"]) for k in best)
    assert any(not torch.equal(best[k], raw[f"vae.{k}"]) for k in best)
    # Its latent scaling factor was measured at the end of the run, as the final model's.
    assert AutoencoderKL.from_pretrained(tmp_path / "vae" / "best").config.scaling_factor != 1.0


def test_evaluation_during_training_leaves_the_training_unchanged(tmp_path):
    """Evaluating every step (random flips on, so the augmentation's RNG is in play) ends with the same weights."""
    for name, every in (("plain", 0), ("evaluated", 1)):
        run(train_vae, tiny_config(tmp_path / name, **QUIET, **{"vae.train.eval_every": every,
                                                                "data.random_flip": True}))
    assert (tmp_path / "evaluated" / "vae" / "best").is_dir() and not (tmp_path / "plain" / "vae" / "best").exists()
    a, b = (load_file(tmp_path / name / "vae" / "model" / "diffusion_pytorch_model.safetensors")
            for name in ("plain", "evaluated"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_feature_metric_without_features_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="vae.eval_metric=rfid needs vae.eval_features"):
        tiny_config(tmp_path, **{"vae.eval_metric": "rfid"})
