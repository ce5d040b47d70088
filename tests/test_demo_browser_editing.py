"""The demo's Edit and Upscale tabs in a real browser (see test_demo_browser.py): paint a mask over an uploaded
image and inpaint it, every unpainted pixel kept; upscale beside bicubic; a wrong-size upload shows the pipeline's
message."""

import io
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from helpers import tiny_unet, tiny_vae
from PIL import Image

pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the browser extra)")

from demo_server import serve
from test_demo_browser import CHROMIUM, STEPS, pytestmark, screenshot, set_number  # noqa: F401  (pytestmark: marks)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM or None, args=["--no-sandbox"])
        yield b
        b.close()

@pytest.fixture(scope="module")
def editing_folders(tmp_path_factory):
    from test_demo_editing import NAMES

    from ldm.pipelines import LatentDiffusionPipeline, LatentSuperResolutionPipeline

    root = tmp_path_factory.mktemp("editing_models")
    torch.manual_seed(0)
    LatentDiffusionPipeline(vae=tiny_vae(1), unet=tiny_unet(num_class_embeds=4), scheduler=DDIMScheduler(),
                            class_names=NAMES).save_pretrained(root / "class")
    torch.manual_seed(1)
    LatentSuperResolutionPipeline(vae=tiny_vae(1), unet=tiny_unet(in_channels=5), scheduler=DDIMScheduler(),
                                  low_res_size=8).save_pretrained(root / "superres")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(root / "image.png")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(root / "low.png")
    return root


def shown_image(page, elem_id: str) -> np.ndarray:
    image = page.locator(f"#{elem_id} img")
    image.wait_for()
    return np.asarray(Image.open(io.BytesIO(page.request.get(image.get_attribute("src")).body())))


def test_inpainting_a_painted_stroke_keeps_every_other_pixel(editing_folders, browser, tmp_path):
    with serve(editing_folders / "class", tmp_path / "gradio") as (url, _):
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.get_by_role("tab", name="Edit").click()
        page.locator("#edit-image input[type=file]").set_input_files(str(editing_folders / "image.png"))
        page.locator("#edit-image canvas").first.wait_for()
        page.wait_for_timeout(1000)  # the editor fits the image to the canvas
        page.locator("#edit-image button[aria-label=Brush]").click()
        # Paint a vertical stroke through the image's right half (the image sits centred in the canvas).
        box = page.locator("#edit-image canvas").first.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        side = min(box["width"], box["height"]) * 0.45  # at most; the stroke stays inside the right half either way
        page.mouse.move(cx + side * 0.25, cy - side * 0.2)
        page.mouse.down()
        page.mouse.move(cx + side * 0.25, cy + side * 0.2, steps=10)
        page.mouse.up()
        page.get_by_label("inpaint").check()
        set_number(page, "edit-steps", STEPS)
        page.locator("#edit-button").click()
        got = shown_image(page, "edit-result")
        screenshot(page, "edit")
        page.close()
    image = np.asarray(Image.open(editing_folders / "image.png"))
    changed = got != image
    assert got.shape == (16, 16) and changed.any()
    assert not changed[:, :8].any()  # nothing left of the stroke's latent cells changed: the unpainted pixels are kept
    assert changed.mean() < 0.5


def test_wrong_size_upload_shows_the_pipelines_message(editing_folders, browser, tmp_path):
    with serve(editing_folders / "superres", tmp_path / "gradio") as (url, _):
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.set_default_timeout(60_000)
        page.goto(url)
        assert page.get_by_role("tab", name="Generate").count() == 0
        page.locator("#upscale-image input[type=file]").set_input_files(str(editing_folders / "low.png"))
        set_number(page, "upscale-steps", STEPS)
        page.locator("#upscale-button").click()
        high, bicubic = shown_image(page, "upscale-result"), shown_image(page, "upscale-bicubic")
        assert high.shape == bicubic.shape == (16, 16)
        screenshot(page, "upscale")
        page.locator("#upscale-image button[aria-label='Remove Image']").click()
        page.locator("#upscale-image input[type=file]").set_input_files(str(editing_folders / "image.png"))
        page.locator("#upscale-button").click()
        page.get_by_text(re.compile(r"image: 16x16 image\(s\), but this model takes 8x8")).first.wait_for()
        page.close()
