"""Super-resolution training (denoiser.task=superres): low-res pairs, degradation, config checks, and the whole run
through `accelerate launch` at a tiny size."""

import json

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image
from test_end_to_end import accelerate_launch

from ldm.cli import main
from ldm.config import ConfigError, DegradeConfig, load_config
from ldm.data import build_datasets, load_digits_dataset
from ldm.degrade import degrade, gaussian_blur
from ldm.pipelines import LatentSuperResolutionPipeline
from ldm.train import latent_cache


def test_digits_low_res_inputs_are_the_native_8x8_scans():
    cfg = load_config(REPO / "configs/digits_sr.yaml")
    train, holdout, info = build_datasets(cfg.data, low_res=True)
    scans = load_digits_dataset()
    plain = build_datasets(cfg.data)[2]
    assert info.fingerprint != plain.fingerprint  # a latent cache with low-res images is a different cache
    for dataset in (train, holdout):
        row = dataset[0]
        assert row["low_res"].shape == (1, 8, 8) and row["pixel_values"].shape == (1, 32, 32)
    # Every held-out low-res image is one of the scans, exactly (0..255 -> [-1, 1]).
    native = {np.asarray(image, dtype=np.float32).tobytes() for image in scans["image"]}
    for i in range(5):
        low = ((holdout[i]["low_res"][0].numpy() + 1) * 127.5).round().astype(np.float32)
        assert low.tobytes() in native


def test_low_res_of_large_images_is_the_same_crop_bicubic(tmp_path):
    from ldm.data import ImageTransform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8))
    full, low = ImageTransform(32, low_res_size=8).apply_pair(image)
    expected = image.resize((51, 32), Image.Resampling.BICUBIC).crop((9, 0, 41, 32))
    np.testing.assert_allclose(((full.permute(1, 2, 0).numpy() + 1) * 127.5), np.asarray(expected), atol=1e-3)
    shrunk = Image.fromarray(((full.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).resize(
        (8, 8), Image.Resampling.BICUBIC)
    # Straight from the source (not through the 32 px image), but the same region: close to shrinking the crop.
    assert np.abs((low.permute(1, 2, 0).numpy() + 1) * 127.5 - np.asarray(shrunk, dtype=np.float32)).mean() < 6


def test_degradation_blur_and_noise():
    low = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(degrade(low, DegradeConfig()), low)  # off by default
    torch.testing.assert_close(gaussian_blur(low, torch.zeros(4), 2.0), low)  # sigma 0: the delta kernel
    blurred = gaussian_blur(low, torch.full((4,), 1.5), 2.0)
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), low.mean(dim=(2, 3)), atol=0.05, rtol=0)
    assert blurred.std() < 0.7 * low.std()
    noisy = degrade(low, DegradeConfig(noise_std=0.2), generator=torch.Generator().manual_seed(0))
    assert 0.02 < (noisy - low).std() < 0.2


@pytest.mark.parametrize(("overrides", "key"), [
    ({"denoiser.task": "superres", "denoiser.conditioning": "class"}, "denoiser.conditioning"),
    ({"denoiser.task": "superres", "denoiser.train.eval_every": 10}, "denoiser.train.eval_every"),
    ({"data.degrade.factor": 3}, "data.degrade.factor"),
    ({"data.degrade.noise_std": -1}, "data.degrade"),
    ({"denoiser.task": "upscale"}, "denoiser.task"),
])
def test_superres_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "configs/tiny.yaml", overrides)


@pytest.mark.slow
def test_accelerate_launch_superres_then_upscale(tmp_path):
    out = tmp_path / "run"
    vae = accelerate_launch("train_vae.py", "--output_dir", str(out), "--train.max_steps=2")
    assert vae.returncode == 0, vae.stderr[-3000:]
    unet = accelerate_launch("train_unet.py", "--output_dir", str(out), "--denoiser.task=superres",
                             "--data.degrade.factor=2", "--data.degrade.blur_sigma=1", "--data.degrade.noise_std=0.1",
                             "--train.max_steps=4", "--train.batch_size=4")
    assert unet.returncode == 0, unet.stderr[-3000:]

    folder = out / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latent_superres", "LatentSuperResolutionPipeline"]
    assert index["low_res_size"] == 8
    assert json.loads((folder / "unet" / "config.json").read_text())["in_channels"] == 4 + 1
    assert "super-resolution" in (folder / "README.md").read_text()
    # The latent cache holds each image's low-res version, the one the data transform makes.
    cfg = load_config(REPO / "configs/tiny.yaml", {"data.degrade.factor": 2})
    (cache_dir,) = (out / "latent_cache").iterdir()
    cached = latent_cache.load(cache_dir)
    train, _, _ = build_datasets(cfg.data, low_res=True)
    assert cached[0][latent_cache.LOW_RES].shape == (1, 8, 8)
    torch.testing.assert_close(cached[3][latent_cache.LOW_RES], train[3]["low_res"])

    pipe = LatentSuperResolutionPipeline.from_pretrained(folder)
    images = pipe(image=[Image.new("L", (8, 8), 128)] * 2, num_inference_steps=2).images
    assert [(im.mode, im.size) for im in images] == [("L", (16, 16))] * 2
    small = tmp_path / "small"
    small.mkdir()
    Image.new("L", (8, 8), 30).save(small / "a.png")
    assert main(["upscale", "--model", str(folder), "--image", str(small), "--steps", "2",
                 "--out", str(tmp_path / "big")]) == 0
    assert Image.open(tmp_path / "big" / "a.png").size == (16, 16)


@pytest.mark.parametrize("name", ["cifar10", "celebahq256", "lsun_bedroom256"])
def test_x4_superres_options_of_the_larger_configs(name):
    text = (REPO / "configs" / f"{name}.yaml").read_text()
    assert "# degrade: {factor: 4" in text and "# task: superres" in text
    cfg = load_config(REPO / "configs" / f"{name}.yaml", {"denoiser.task": "superres", "data.degrade.factor": 4})
    assert cfg.data.resolution // cfg.data.degrade.factor == cfg.data.resolution // 4
