"""The demo's Edit and Upscale tabs in a real browser (see test_demo_browser.py): paint a mask over an uploaded
image and inpaint it, every unpainted pixel kept; upscale beside bicubic; a wrong-size upload shows the pipeline's
message."""

import io
import re
import time

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
    """The PNG an Image output holds, fetched from its own URL, as soon as the app has set it; the app's error
    message instead, at once, if the run failed (a wait for the picture alone would sit out the whole timeout)."""
    image, error = page.locator(f"#{elem_id} img[src]"), page.locator(".toast-body")
    image.or_(error).first.wait_for(state="attached")
    if not image.count():
        pytest.fail(f"the page shows an error instead of #{elem_id}: {error.first.inner_text()}")
    # Attached, not visible: the <img> is lazily loaded and has no width until the browser has fetched it, which
    # depends on where the page is scrolled; the file is fetched here.
    return np.asarray(Image.open(io.BytesIO(page.request.get(image.get_attribute("src")).body())))


def editor_view(page) -> np.ndarray:
    """What the image editor shows now (RGB screenshot of the component)."""
    return np.asarray(Image.open(io.BytesIO(page.locator("#edit-image").screenshot())).convert("RGB")).astype(int)


def wait_for_editor(page, what: str, shown, timeout_s: float = 60) -> None:
    """Poll the editor's picture until `shown(pixels)`: the state of the page itself, however slow the browser."""
    deadline = time.monotonic() + timeout_s
    while not shown(editor_view(page)):
        if time.monotonic() > deadline:
            pytest.fail(f"the image editor did not show {what} within {timeout_s:g} s")
        page.wait_for_timeout(100)


def uploaded_image_shown(pixels: np.ndarray) -> bool:
    # The 16 px noise image, enlarged to fit: thousands of dark pixels (the empty editor has only thin icons).
    return int((pixels.max(axis=-1) < 100).sum()) > 2000


def stroke_shown(pixels: np.ndarray) -> bool:
    # The brush colour #ff00ff over the image (the toolbar's colour swatch alone is a few hundred pixels).
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(((r > 200) & (g < 80) & (b > 200)).sum()) > 1000


def test_inpainting_a_painted_stroke_keeps_every_other_pixel(editing_folders, browser, tmp_path):
    with serve(editing_folders / "class", tmp_path / "gradio") as (url, _):
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.get_by_role("tab", name="Edit").click()
        # The editor builds its canvas after the tab opens (a second or more on a busy machine), and a file given
        # to its input before that is dropped: the editor stays empty, the stroke makes a blank canvas, and the
        # run fails ("image: 800x800 image(s) ...") with no result. So upload once the canvas is there, and paint
        # once the editor shows the image (it reads, decodes and fits the file after the upload returns).
        page.locator("#edit-image canvas").first.wait_for()
        page.locator("#edit-image input[type=file]").set_input_files(str(editing_folders / "image.png"))
        wait_for_editor(page, "the uploaded image", uploaded_image_shown)
        page.locator("#edit-image button[aria-label=Brush]").click()
        # Paint a vertical stroke through the image's right half (the image sits centred in the canvas).
        box = page.locator("#edit-image canvas").first.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        side = min(box["width"], box["height"]) * 0.45  # at most; the stroke stays inside the right half either way
        page.mouse.move(cx + side * 0.25, cy - side * 0.2)
        page.mouse.down()
        page.mouse.move(cx + side * 0.25, cy + side * 0.2, steps=10)
        page.mouse.up()
        wait_for_editor(page, "the painted stroke", stroke_shown)
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
