"""Push a pipeline to a local stand-in of the Hub's HTTP API and load it back from there, over real HTTP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hub_stand_in import HubStandIn
from test_pipeline import tiny_pipeline

from ldm.config import load_config
from ldm.model_card import write_model_card

REPO = Path(__file__).resolve().parents[1]

LOAD_BOTH_WAYS = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
from ldm.pipelines import LatentDiffusionPipeline
ours = LatentDiffusionPipeline.from_pretrained(sys.argv[1])
assert type(ours) is LatentDiffusionPipeline, type(ours)
remote = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
for name, pipe in (("ours", ours), ("remote", remote)):
    out = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    np.save(sys.argv[2] + f"/{name}.npy", out.images)
"""


def hub_env(url: str, home: Path) -> dict:
    return {**os.environ, "HF_ENDPOINT": url, "HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "0", "HF_HOME": str(home),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_MODULES_CACHE": str(home / "modules")}


def test_push_keeps_model_card_and_loads_back_from_the_hub(tmp_path):
    model_dir = tmp_path / "pipeline"
    pipe = tiny_pipeline(channels=1)
    pipe.save_pretrained(model_dir)
    cfg = load_config(REPO / "configs/tiny.yaml", {"output_dir": str(tmp_path / "run")})
    write_model_card(model_dir, cfg, repo_hint="me/tiny-ldm")
    local = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")

    with HubStandIn() as hub:
        env = hub_env(hub.url, tmp_path / "hf_home")
        pushed = subprocess.run(
            [sys.executable, "-m", "ldm.cli", "push", "--model", str(model_dir), "--repo_id", "me/tiny-ldm"],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        files = hub.state.repos["me/tiny-ldm"]
        assert {"model_index.json", "pipeline_latent_diffusion.py", "latents.py", "README.md", "training_config.json",
                "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json"} <= files.keys()
        assert files["model_index.json"] == (model_dir / "model_index.json").read_bytes()
        card = files["README.md"].decode()
        assert card.startswith("---\nlibrary_name: diffusers\n")
        assert 'from_pretrained("me/tiny-ldm", trust_remote_code=True)' in card
        u = cfg.denoiser  # the card names the sampler the pipeline is saved with, and its snippet uses its step count
        assert f"| saved sampler | `{u.sample_scheduler}`, {u.sample_timestep_spacing} timestep spacing, " \
               f"{u.sample_steps} steps |" in card
        assert f"num_inference_steps={u.sample_steps}," in card
        assert json.loads(files["training_config.json"])["data"]["resolution"] == 16

        loaded = subprocess.run(
            [sys.executable, "-c", LOAD_BOTH_WAYS, "me/tiny-ldm", str(tmp_path)],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )
        assert loaded.returncode == 0, loaded.stderr[-3000:]
    for name in ("ours", "remote"):
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), local.images, atol=1e-5)


def test_push_of_a_folder_without_a_pipeline_fails_clearly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ldm.cli", "push", "--model", str(tmp_path), "--repo_id", "me/x"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "has no model_index.json" in result.stderr
