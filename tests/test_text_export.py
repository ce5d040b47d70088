"""Text models are saved as stock StableDiffusionPipeline folders only where those draw the right images: an
autoencoder with a shift_factor (which StableDiffusionPipeline never adds back) or 16 latent channels makes ldm's
LatentTextToImagePipeline, said in one line, and both loading routes give the same images as the trained pipeline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from ldm.config import TextModelConfig
from ldm.pipelines import latents
from ldm.pipelines.loading import load_pipeline
from ldm.pipelines.text_to_image import make_text_pipeline, save_text_pipeline
from ldm.text_encoder import build_text_encoder
from ldm.tokenizer import build_clip_tokenizer

LOAD_REMOTE = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
print(type(pipe).__name__)
out = pipe(["a cat"], num_inference_steps=2, guidance_scale=1.5, generator=torch.Generator().manual_seed(0),
           output_type="np")
np.save(sys.argv[2], out.images)
"""


def text_pipeline(tmp_path, latent_channels: int = 4, shift_factor: float | None = None):
    tokenizer = build_clip_tokenizer(["a cat", "a dog"], 1024, 8, tmp_path / "tokenizer")
    torch.manual_seed(0)
    encoder = build_text_encoder(TextModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                                 tokenizer)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32, 32), latent_channels=latent_channels,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16, scaling_factor=0.8, shift_factor=shift_factor)
    unet = UNet2DConditionModel(sample_size=8, in_channels=latent_channels, out_channels=latent_channels,
                                block_out_channels=(32, 32), layers_per_block=1,
                                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    return make_text_pipeline(vae, unet, encoder, tokenizer, DDIMScheduler(), guidance_scale=1.5)


def draw(pipe, output_type="np"):
    return pipe(["a cat"], num_inference_steps=2, guidance_scale=1.5, generator=torch.Generator().manual_seed(0),
                output_type=output_type).images


def test_a_four_channel_autoencoder_without_shift_stays_a_stock_folder(tmp_path, capsys):
    save_text_pipeline(text_pipeline(tmp_path), tmp_path / "text")
    index = json.loads((tmp_path / "text" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert "LatentTextToImagePipeline" not in capsys.readouterr().out
    assert type(load_pipeline(tmp_path / "text")).__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize("channels, shift, why", [(4, 0.3, "shift_factor 0.3000"), (16, None, "16 latent channels")])
def test_a_shift_or_16_channels_saves_ldms_pipeline_that_decodes_with_the_shift(tmp_path, capsys, channels, shift, why):
    pipe = text_pipeline(tmp_path, channels, shift)
    assert type(pipe).__name__ == "LatentTextToImagePipeline"
    expected = draw(pipe)
    # The decode is latents.decode's, shift included: D(z / scale + shift).
    z = draw(pipe, output_type="latent")
    with torch.no_grad():
        by_hand = (latents.decode(pipe.vae, z) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(expected, by_hand, atol=1e-6)

    save_text_pipeline(pipe, tmp_path / "text")
    out = capsys.readouterr().out
    assert f"saved as ldm's LatentTextToImagePipeline, not a stock StableDiffusionPipeline: its autoencoder has {why}" in out
    assert len([line for line in out.splitlines() if "LatentTextToImagePipeline" in line]) == 1
    index = json.loads((tmp_path / "text" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latent_text_to_image", "LatentTextToImagePipeline"]
    assert (tmp_path / "text" / "pipeline_latent_text_to_image.py").is_file()

    ours = load_pipeline(tmp_path / "text")
    assert type(ours).__name__ == "LatentTextToImagePipeline"
    np.testing.assert_allclose(draw(ours), expected, atol=1e-5)
    # Where ldm is not installed: diffusers runs the saved code.
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", LOAD_REMOTE, str(tmp_path / "text"), str(tmp_path / "remote.npy")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LatentTextToImagePipeline" in result.stdout
    np.testing.assert_allclose(np.load(tmp_path / "remote.npy"), expected, atol=1e-5)
