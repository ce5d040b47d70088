"""`ldm sample` on class and text models: one row per label or prompt, and clear errors, before any weights load,
for conditions a model does not take."""

import re

import numpy as np
import pytest
from diffusers import DDIMScheduler
from helpers import tiny_text_models
from PIL import Image
from test_class_conditioning import class_pipeline
from test_pipeline import tiny_pipeline

from ldm.cli import main
from ldm.pipelines import LatentDiffusionPipeline
from ldm.pipelines.loading import folder_conditioning, load_pipeline
from ldm.pipelines.text_to_image import make_text_pipeline, save_text_pipeline


def save_tiny_models(root):
    """root/class (classes cat, dog, fox), root/none and root/text (a stock Stable Diffusion folder): tiny models of
    each conditioning, saved as training saves them."""
    class_pipeline().save_pretrained(root / "class")  # classes cat, dog, fox
    tiny_pipeline(channels=1).save_pretrained(root / "none")
    tokenizer, encoder, vae, unet = tiny_text_models(["a cat", "a dog"], root / "tokenizer")
    save_text_pipeline(make_text_pipeline(vae, unet, encoder, tokenizer, DDIMScheduler()), root / "text")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def sample(folder, out, *extra: str) -> int:
    return main(["sample", "--model", str(folder), "--steps", "2", "--out", str(out), "--device", "cpu", *extra])


def test_folders_say_what_they_are_conditioned_on(folders):
    assert folder_conditioning(folders / "class") == ("class", ["cat", "dog", "fox"], 3)
    assert folder_conditioning(folders / "none") == ("none", None, None)
    assert folder_conditioning(folders / "text") == ("text", None, None)
    assert type(load_pipeline(folders / "class")) is LatentDiffusionPipeline
    assert type(load_pipeline(folders / "text")).__name__ == "StableDiffusionPipeline"


def test_class_rows_by_id_name_or_all(folders, tmp_path):
    assert sample(folders / "class", tmp_path / "all.png", "--num_images", "2", "--seed", "4") == 0
    grid = np.asarray(Image.open(tmp_path / "all.png").convert("L"))
    assert grid.shape == (3 * 16, 2 * 16)  # every class, one row each
    assert sample(folders / "class", tmp_path / "fox.png", "--class_labels", "fox", "--num_images", "2",
                  "--seed", "8") == 0
    fox = np.asarray(Image.open(tmp_path / "fox.png").convert("L"))
    np.testing.assert_array_equal(fox, grid[32:])  # row 3 of 'all' is fox with seeds 8, 9: the same images


def test_long_rows_wrap_into_blocks_of_16_columns(folders, tmp_path):
    assert sample(folders / "class", tmp_path / "two.png", "--class_labels", "cat,fox", "--num_images", "20",
                  "--seed", "1") == 0
    grid = np.asarray(Image.open(tmp_path / "two.png").convert("L"))
    assert grid.shape == (2 * 2 * 16, 16 * 16)  # each class: a block of two rows, 16 images and 4
    assert not grid[16:32, 4 * 16:].any()  # the rest of cat's second row is blank: fox starts a row of its own
    assert sample(folders / "class", tmp_path / "fox.png", "--class_labels", "fox", "--num_images", "20",
                  "--seed", "21") == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "fox.png").convert("L")), grid[32:])


def test_text_rows_per_prompt(folders, tmp_path):
    args = ("--prompt", "a cat", "--prompt", "a dog", "--negative_prompt", "a cat", "--num_images", "3",
            "--guidance_scale", "2")
    assert sample(folders / "text", tmp_path / "text.png", *args) == 0
    assert Image.open(tmp_path / "text.png").size == (3 * 16, 2 * 16)


@pytest.mark.parametrize("model, extra, message", [
    ("class", ("--class_labels", "3"), r"--class_labels: 3 \(the null class of classifier-free guidance"),
    ("class", ("--class_labels", "cat,wolf"), "unknown class name 'wolf'"),
    ("class", ("--class_labels", ","), "names no class"),
    ("class", ("--prompt", "a cat"), "--prompt does not apply: .* is a class-conditional model"),
    ("class", ("--guidance_scale", "-1"), "--guidance_scale must be >= 0"),
    ("none", ("--class_labels", "1"), "--class_labels does not apply: .* is an unconditional model"),
    ("none", ("--guidance_scale", "2"), "--guidance_scale does not apply"),
    ("text", ("--class_labels", "1"), "--class_labels does not apply: .* is a text-to-image model"),
    ("text", (), "--prompt is required"),
    ("text", ("--prompt", "a", "--prompt", "b", "--negative_prompt", "x", "--negative_prompt", "y",
              "--negative_prompt", "z"), "--negative_prompt given 3 times for 2 prompts"),
])
def test_bad_conditions_stop_before_loading(folders, tmp_path, capsys, monkeypatch, model, extra, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr("ldm.pipelines.loading.load_pipeline", no_loading)
    assert sample(folders / model, tmp_path / "grid.png", *extra) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "grid.png").exists()
