"""`ldm train-classifier | eval | eval-vae | sweep` on digits at 16 px and a tiny untrained pipeline."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from PIL import Image

from ldm.cli import main
from ldm.eval import features as F
from ldm.eval import metrics as M
from ldm.eval.evaluation import extract_images, load_data
from ldm.eval.sweep import read_csv
from ldm.pipelines import LatentDiffusionPipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_config(tmp_path_factory) -> Path:
    """configs/tiny.yaml (digits, 16 px grayscale) with every image: 1617 to train on, 180 held out."""
    cfg = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    cfg["data"]["max_samples"] = None
    path = tmp_path_factory.mktemp("data") / "digits16.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def classifier_dir(data_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "classifier"
    assert main(["train-classifier", "--data", str(data_config), "--out", str(out), "--epochs", "6"]) == 0
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained pipeline making 16x16 grayscale images from 4x8x8 latents (shapes match the data)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, sample_size=16)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    path = tmp_path_factory.mktemp("model") / "pipeline"
    LatentDiffusionPipeline(vae=vae, unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def test_classifier_is_accurate_and_real_images_score_at_least_its_test_accuracy(classifier_dir, data_config):
    config = json.loads((classifier_dir / "config.json").read_text())
    assert (classifier_dir / "classifier.safetensors").is_file()
    assert config["channels"] == 1 and config["resolution"] == 16 and config["num_classes"] == 10
    assert config["test_accuracy"] > 0.85
    # A perfect "generator" (real images): accuracy >= the classifier's held-out accuracy, features close to the
    # reference set's, classes nearly uniform.
    network = F.load_feature_network(classifier_dir)
    train, holdout, _ = load_data(str(data_config), 1, 16)
    real = F.cached_real_features(network, train, "test", "train", cache_dir=None)
    assert M.accuracy(real["logits"], real["labels"]) >= config["test_accuracy"]
    perfect = F.extract(network, [{"pixel_values": torch.stack([holdout[i]["pixel_values"] for i in range(180)])}])
    noise = extract_images(network, torch.rand(180, 1, 16, 16) * 2 - 1, 64, "cpu")
    assert M.frechet_distance(real["features"], perfect["features"]) < 0.2 * M.frechet_distance(
        real["features"], noise["features"])
    assert M.class_distribution(perfect["logits"])["class_kl_to_uniform"] < 0.1


def run_eval(model_dir, data_config, classifier_dir, cache, out, *extra):
    return main(["eval", "--model", str(model_dir), "--data", str(data_config), "--features", str(classifier_dir),
                 "--num_samples", "12", "--steps", "2", "--batch_size", "12", "--cache_dir", str(cache),
                 "--out", str(out), *extra])


def test_eval_writes_json_naming_classifier_fid_and_caches_real_features(
        model_dir, data_config, classifier_dir, tmp_path, capsys, monkeypatch):
    calls = []
    extract = F.extract
    monkeypatch.setattr(F, "extract", lambda *a, **k: calls.append(1) or extract(*a, **k))
    assert run_eval(model_dir, data_config, classifier_dir, tmp_path / "cache", tmp_path / "a.json") == 0
    table = capsys.readouterr().out
    assert "classifier-FID" in table and "classifier-FID features: SmallCNN" in table
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["feature_network"].startswith("classifier-FID features")
    assert (result["sampler"], result["steps"], result["num_samples"], result["num_real"]) == ("ddim", 2, 12, 1617)
    assert result["seconds_per_image"] > 0
    m = result["metrics"]
    assert not any(key in m for key in ("FID", "KID", "IS")), "classifier scores must not be named like Inception's"
    for key in ("classifier-FID", "classifier-KID", "classifier-IS", "classifier-precision", "classifier-recall",
                "class_entropy", "class_kl_to_uniform", "class_kl_to_real", "real_accuracy"):
        assert isinstance(m[key], float), key
    assert m["classifier-FID"] > 0 and len(m["class_fractions"]) == len(m["real_class_fractions"]) == 10
    assert len(calls) == 2  # real images, then samples
    assert len(list((tmp_path / "cache").glob("real-*.safetensors"))) == 1

    calls.clear()  # second evaluation: the real features come from the cache
    assert run_eval(model_dir, data_config, classifier_dir, tmp_path / "cache", tmp_path / "b.json",
                    "--metrics", "fid") == 0
    assert len(calls) == 1
    again = json.loads((tmp_path / "b.json").read_text())["metrics"]
    assert set(again) >= {"classifier-FID"} and "classifier-KID" not in again
    assert again["classifier-FID"] == pytest.approx(m["classifier-FID"])


def test_eval_without_inception_weights_says_so_and_offers_the_classifier(model_dir, data_config, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    code = main(["eval", "--model", str(model_dir), "--data", str(data_config), "--num_samples", "4"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Inception" in err and "ldm train-classifier" in err and "--features" in err
    assert "Traceback" not in err


def test_sweep_writes_csv_and_plot(model_dir, data_config, classifier_dir, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(model_dir), "--data", str(data_config), "--features", str(classifier_dir),
                 "--schedulers", "ddim,euler", "--steps", "1,3", "--timestep_spacing", "leading,trailing",
                 "--num_samples", "8", "--batch_size", "8", "--cache_dir", str(tmp_path / "cache"),
                 "--out_dir", str(out)]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["scheduler"], r["timestep_spacing"], r["steps"]) for r in rows] == [
        (name, spacing, steps) for name in ("ddim", "euler") for spacing in ("leading", "trailing")
        for steps in ("1", "3")]
    assert all(r["metric"] == "classifier-FID" and float(r["value"]) > 0 for r in rows)
    assert all(float(r["seconds_per_image"]) > 0 for r in rows)
    # The same seeds with another spacing visit other timesteps, hence other samples and another score.
    value = {(r["scheduler"], r["timestep_spacing"], r["steps"]): float(r["value"]) for r in rows}
    assert value["ddim", "leading", "3"] != value["ddim", "trailing", "3"]
    with Image.open(out / "sweep.png") as plot:
        assert plot.width > 500
    again = read_csv(out / "sweep.csv", out / "sweep.csv")  # parts of a sweep read back together, typed
    assert len(again) == 2 * len(rows) and again[0]["value"] == float(rows[0]["value"])
    assert isinstance(again[0]["steps"], int) and isinstance(again[0]["seconds_per_image"], float)


def test_eval_vae_reports_psnr_ssim_and_classifier_rfid(model_dir, data_config, classifier_dir, tmp_path, capsys):
    out = tmp_path / "vae.json"
    assert main(["eval-vae", "--vae", str(model_dir), "--data", str(data_config), "--features", str(classifier_dir),
                 "--out", str(out)]) == 0
    assert "classifier-rFID" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["num_images"] == 180 and result["feature_network"].startswith("classifier-FID")
    assert result["psnr"] < 30 and -1 <= result["ssim"] < 0.9  # an untrained autoencoder
    assert result["classifier-rFID"] > 0


def test_bad_arguments_are_clear_errors(model_dir, data_config, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--data", str(data_config)]) == 2
    assert "has no model_index.json" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--data", str(data_config), "--features", str(tmp_path)]) == 2
    assert "ldm train-classifier" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "--model", str(model_dir), "--data", str(data_config), "--schedulers", "ddim,nope"])


def test_training_reports_metrics_and_keeps_the_best_unet(classifier_dir, tmp_path, capsys, monkeypatch):
    """train_vae ends with SSIM, classifier-rFID and recall, and with eval_every keeps vae/best/ by rFID; train_unet
    with eval_every keeps unet/best/."""
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    from accelerate.state import AcceleratorState

    from ldm.config import load_config
    from ldm.train.unet import train_unet
    from ldm.train.vae import train_vae

    quiet = {f"{stage}.train.{k}": v for stage in ("vae", "unet")
             for k, v in (("max_steps", 2), ("checkpointing_steps", 0), ("sample_every", 0), ("report_to", "none"))}
    cfg = load_config(REPO / "configs/tiny.yaml", {
        "output_dir": str(tmp_path), "vae.eval_features": str(classifier_dir), **quiet,
        "vae.train.eval_every": 1, "vae.eval_metric": "rfid",
        "denoiser.train.max_steps": 4, "denoiser.train.eval_every": 2, "denoiser.eval_features": str(classifier_dir),
        "denoiser.eval_num_samples": 8, "denoiser.sample_steps": 2})
    AcceleratorState._reset_state(reset_partial_state=True)
    metrics = train_vae(cfg)
    saved = json.loads((tmp_path / "vae" / "metrics.json").read_text())
    for key in ("holdout_psnr", "holdout_ssim", "holdout_classifier-rFID", "holdout_classifier-recall"):
        assert isinstance(saved[key], float) and saved[key] == metrics[key], key
    best = json.loads((tmp_path / "vae" / "best" / "metrics.json").read_text())
    assert best["step"] in (1, 2) and best["metric"] == "classifier-rFID" and best["value"] > 0
    assert saved["feature_network"].startswith("classifier-FID features")
    out = capsys.readouterr().out
    assert "held-out ssim" in out and "held-out classifier-rFID" in out

    AcceleratorState._reset_state(reset_partial_state=True)
    train_unet(cfg)
    best = json.loads((tmp_path / "unet" / "best" / "metrics.json").read_text())
    assert best["step"] in (2, 4) and best["metric"] == "classifier-FID" and best["value"] > 0
    assert best["num_samples"] == 8 and best["feature_network"].startswith("classifier-FID features")
    assert LatentDiffusionPipeline.from_pretrained(tmp_path / "unet" / "best").unet.config.sample_size == 8
    assert list((tmp_path / "cache" / "features").glob("real-digits-*.safetensors"))


@pytest.mark.slow
def test_two_processes_split_the_samples_and_agree_with_one(model_dir, data_config, classifier_dir, tmp_path):
    """`accelerate launch --num_processes 2 ldm eval`: each process samples half, the gathered result is the same."""
    import os
    import shutil
    import subprocess
    import sys

    assert run_eval(model_dir, data_config, classifier_dir, tmp_path / "cache", tmp_path / "one.json") == 0
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    ldm_script = shutil.which("ldm", path=os.path.dirname(sys.executable)) or "ldm"
    # No GPU here: ACCELERATE_USE_CPU makes the two processes one DDP group over gloo.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", ldm_script, "eval", "--model", str(model_dir),
         "--data", str(data_config), "--features", str(classifier_dir), "--num_samples", "12", "--steps", "2",
         "--batch_size", "12", "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "two.json")],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["num_samples"] == one["num_samples"] == 12
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    for key in ("classifier-FID", "classifier-KID", "classifier-precision", "classifier-recall"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-6), key
