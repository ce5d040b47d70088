"""Both training scripts through `accelerate launch`, as a user runs them, then the saved pipeline."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.pipelines import LatentDiffusionPipeline

REPO = Path(__file__).resolve().parents[1]


def accelerate_launch(script: str, *args: str) -> subprocess.CompletedProcess:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    command = [launcher, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(REPO / script), "--config", str(REPO / "configs/tiny.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600, check=False)


@pytest.mark.slow
def test_accelerate_launch_both_stages_then_sample(tmp_path):
    out = tmp_path / "run"
    vae = accelerate_launch("train_vae.py", "--output_dir", str(out), "--train.max_steps=8")
    assert vae.returncode == 0, vae.stderr[-3000:]
    assert "held-out PSNR" in vae.stdout
    metrics = json.loads((out / "vae" / "metrics.json").read_text())
    assert metrics["scaling_factor"] > 0 and np.isfinite(metrics["holdout_psnr"])

    unet = accelerate_launch("train_unet.py", "--output_dir", str(out), "--train.max_steps=8",
                             "--train.batch_size=4")
    assert unet.returncode == 0, unet.stderr[-3000:]
    # The resolved config of each stage is saved with the run.
    assert "max_steps: 8" in (out / "unet" / "config.yaml").read_text()
    assert "batch_size: 4" in (out / "unet" / "config.yaml").read_text()

    pipeline_dir = out / "pipeline"
    assert {"model_index.json", "pipeline_latent_diffusion.py", "latents.py"} <= {p.name for p in pipeline_dir.iterdir()}
    assert list(pipeline_dir.glob("*/diffusion_pytorch_model.safetensors"))
    assert not list(pipeline_dir.rglob("*.bin"))
    pipe = LatentDiffusionPipeline.from_pretrained(pipeline_dir)
    assert pipe.vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3).images
    assert [(im.mode, im.size) for im in images] == [("L", (16, 16))] * 2

    grid = Image.open(out / "unet" / "samples" / "final.png")
    assert grid.size == (2 * 16, 2 * 16)  # 4 sample images, 2x2


@pytest.mark.slow
def test_ldm_sample_cli_on_trained_pipeline(tmp_path):
    out = tmp_path / "run"
    assert accelerate_launch("train_vae.py", "--output_dir", str(out), "--train.max_steps=2").returncode == 0
    assert accelerate_launch("train_unet.py", "--output_dir", str(out), "--train.max_steps=2").returncode == 0
    grid = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "ldm.cli", "sample", "--model", str(out / "pipeline"), "--num_images", "6",
         "--steps", "3", "--scheduler", "ddpm", "--seed", "1", "--out", str(grid)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(grid).size == (3 * 16, 2 * 16)
