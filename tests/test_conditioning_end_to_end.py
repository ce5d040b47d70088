"""Class and text conditioning through `accelerate launch`, as a user runs them: the saved folders, `ldm sample`, and
a text model loaded by stock diffusers pipelines in a process that cannot import ldm."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import saved_tiny_vae
from PIL import Image
from test_class_conditioning import BLOCK_LDM
from test_end_to_end import accelerate_launch

from ldm.cli import main
from ldm.pipelines import LatentDiffusionPipeline
from ldm.pipelines.loading import load_pipeline

# GroupNorm groups of 4 channels: with the tiny config's one channel per group, GroupNorm would remove the timestep
# and class embeddings (they are added per channel) and the class could not matter.
CONDITIONAL = ("--denoiser.model.norm_num_groups=8", "--train.max_steps=8", "--train.num_sample_images=10")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """An autoencoder of configs/tiny.yaml's shape (test_end_to_end trains one through accelerate launch already)."""
    return saved_tiny_vae(tmp_path_factory.mktemp("vae") / "model")


@pytest.mark.slow
def test_class_model_end_to_end(vae_dir, tmp_path):
    out = tmp_path / "class"
    result = accelerate_launch("train_unet.py", "--output_dir", str(out), "--denoiser.conditioning=class",
                               f"--denoiser.vae_path={vae_dir}", *CONDITIONAL)
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["class_names"] == [str(i) for i in range(10)]
    assert index["guidance_scale"] == 1.5  # the grids' denoiser.guidance_scale, kept for sampling (test_guidance_default)
    assert json.loads((out / "pipeline" / "unet" / "config.json").read_text())["num_class_embeds"] == 11
    assert Image.open(out / "unet" / "samples" / "final.png").size == (16, 10 * 16)  # one row per class
    assert "class_labels=[0, 1, 2, 3]" in (out / "pipeline" / "README.md").read_text()

    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(out / "pipeline"), "--class_labels", "3,7", "--guidance_scale", "3",
                 "--num_images", "2", "--steps", "3", "--seed", "5", "--out", str(grid)]) == 0
    grid = np.asarray(Image.open(grid).convert("L"))
    assert grid.shape == (2 * 16, 2 * 16)  # a row per label
    pipe = LatentDiffusionPipeline.from_pretrained(out / "pipeline")  # with the saved (default) sampler, as ldm sample
    pipe.set_progress_bar_config(disable=True)
    seven = pipe(class_labels=["7"], guidance_scale=3.0, generator=[torch.Generator().manual_seed(8)],
                 num_inference_steps=3).images[0]  # row 1, column 1: image 3, seed 5 + 3
    assert np.abs(np.asarray(seven, dtype=int) - grid[16:, 16:]).max() <= 1


STOCK_SCRIPT = BLOCK_LDM + textwrap.dedent(
    """
    import numpy as np, torch
    from PIL import Image
    from diffusers import (AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline,
                           DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)

    torch.set_num_threads(1)
    model_dir, out = sys.argv[1:3]
    for cls in (DiffusionPipeline, AutoPipelineForText2Image, StableDiffusionPipeline):
        pipe = cls.from_pretrained(model_dir)  # no trust_remote_code: stock classes only
        assert type(pipe) is StableDiffusionPipeline, type(pipe)
    pipe.set_progress_bar_config(disable=True)
    def run(p, **kw):
        return p(generator=torch.Generator().manual_seed(3), num_inference_steps=3, output_type="np", **kw).images
    results = {"text": run(pipe, prompt=["a handwritten digit 3", "a handwritten digit 8"], guidance_scale=2.0),
               "negative": run(pipe, prompt="a handwritten digit 3", negative_prompt="a handwritten digit 5")}
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    results["dpm"] = run(pipe, prompt="a handwritten digit 1")
    assert type(AutoPipelineForImage2Image.from_pretrained(model_dir)) is StableDiffusionImg2ImgPipeline
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(model_dir)
    img2img.set_progress_bar_config(disable=True)
    gray = Image.fromarray(np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1)), "L")
    results["img2img"] = img2img("a handwritten digit 0", image=gray, strength=0.6,
                                 generator=torch.Generator().manual_seed(3), num_inference_steps=5,
                                 output_type="np").images
    np.savez(out, **results)
    """
)


@pytest.mark.slow
def test_text_model_end_to_end_is_a_stock_stable_diffusion_folder(vae_dir, tmp_path):
    out = tmp_path / "text"
    # A deterministic saved sampler: the stock pipeline draws a batch from one generator, `ldm sample` each image from
    # its own, so only without fresh noise per step are the images the same.
    result = accelerate_launch("train_unet.py", "--output_dir", str(out), "--denoiser.conditioning=text",
                               "--data.caption_template=a handwritten digit {name}", f"--denoiser.vae_path={vae_dir}",
                               "--denoiser.sample_scheduler=ddim", *CONDITIONAL)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = out / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["_guidance_scale"] == 1.5  # denoiser.guidance_scale; stock loaders drop "_" keys silently
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (folder / "tokenizer").iterdir()}
    assert not list(folder.glob("*.py"))  # no code of ours travels with it
    assert Image.open(out / "unet" / "samples" / "final.png").size == (16, 10 * 16)

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    stock = subprocess.run([sys.executable, "-I", "-c", STOCK_SCRIPT, str(folder), str(tmp_path / "stock.npz")],
                           check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert stock.returncode == 0, stock.stderr[-3000:]
    remote = np.load(tmp_path / "stock.npz")
    assert remote["text"].shape == (2, 16, 16, 1) and remote["img2img"].shape == (1, 16, 16, 1)

    # ldm's own sampling (ldm sample) draws the same images as the stock pipeline.
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(folder), "--prompt", "a handwritten digit 3", "--guidance_scale", "2",
                 "--num_images", "1", "--steps", "3", "--seed", "3", "--scheduler", "ddim", "--out", str(grid)]) == 0
    stock_first = (remote["text"][0, :, :, 0] * 255).round()
    assert np.abs(np.asarray(Image.open(grid).convert("L"), dtype=float) - stock_first).max() <= 1
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    local = pipe(prompt=["a handwritten digit 3", "a handwritten digit 8"], guidance_scale=2.0, num_inference_steps=3,
                 generator=torch.Generator().manual_seed(3), output_type="np").images
    np.testing.assert_allclose(local, remote["text"], atol=1e-5)
    assert np.abs(remote["negative"] - remote["text"][:1]).max() > 1e-3  # the negative prompt steers
