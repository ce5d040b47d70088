"""The demo in a real browser: Playwright drives a headless Chromium through the page as a visitor does.

Select these tests alone with `python -m pytest -m browser`. They need the browser extra and a Chromium: Debian's
package (`apt-get install chromium`), Playwright's own (`playwright install chromium`), or LDM_CHROMIUM=/path/to/it.
With LDM_DEMO_SCREENSHOTS=docs they also write the README's screenshots (docs/demo_<tab>.png), and with
LDM_DEMO_BROWSER_MODEL=runs/digits/pipeline the Generate test drives a trained model instead of a tiny one.
"""

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the browser extra)")

from demo_server import serve
from test_cli_conditional import save_tiny_models
from test_demo import reference

from ldm.demo.serving import read_capabilities

STEPS = 3
TRAINED = os.environ.get("LDM_DEMO_BROWSER_MODEL")  # an unconditional or class model folder, for the screenshots


def find_chromium() -> str | None:
    """A Chromium binary: $LDM_CHROMIUM, the system's, or Playwright's own download ("" means Playwright's)."""
    for candidate in (os.environ.get("LDM_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      shutil.which("google-chrome")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    with playwright.sync_playwright() as p:
        return "" if os.path.exists(p.chromium.executable_path) else None


CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to drive: apt-get install chromium, or playwright install "
                       "chromium, or set LDM_CHROMIUM to a Chromium binary"),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        b = p.chromium.launch(executable_path=CHROMIUM or None, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1100, "height": 640})
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator("#generate-button").wait_for()
    return page


@pytest.fixture(scope="module")
def class_page(folders, browser, tmp_path_factory):
    with serve(folders / "class", tmp_path_factory.mktemp("gradio")) as (url, _):
        page = open_page(browser, url)
        yield page
        page.close()


def set_number(page, elem_id: str, value) -> None:
    """Type into a Number box or a Slider's number field, as a visitor would."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def choose(page, elem_id: str, value: str) -> None:
    """Type into a Dropdown (picking the option when there is one) and leave it."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    options = page.get_by_role("option", name=value, exact=True)
    if options.count():
        options.first.click()
    else:
        box.press("Enter")
    page.locator("h1").click()  # blur: a custom value is committed when the box loses focus


def gallery_images(page, count: int) -> list[np.ndarray]:
    """The PNG files the gallery shows, fetched from the page's own URLs."""
    images = page.locator("#gallery img")
    images.nth(count - 1).wait_for()
    assert images.count() == count
    sources = [images.nth(i).get_attribute("src") for i in range(count)]
    return [np.asarray(Image.open(io.BytesIO(page.request.get(src).body()))) for src in sources]


def screenshot(page, tab: str) -> None:
    folder = os.environ.get("LDM_DEMO_SCREENSHOTS")
    if folder:
        page.evaluate("window.scrollTo(0, 0)")
        path = Path(folder) / f"demo_{tab}.png"
        page.screenshot(path=path)
        # A palette PNG keeps the README's figure small.
        Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)


def test_generate_shows_the_pipelines_images_for_the_seed(folders, browser, tmp_path):
    folder, steps = (Path(TRAINED), 50) if TRAINED else (folders / "class", STEPS)
    with serve(folder, tmp_path / "gradio") as (url, pipes):
        page = open_page(browser, url)
        class_model = getattr(pipes["generate"], "num_classes", None) is not None
        if class_model:
            choose(page, "class-label", "dog" if not TRAINED else "3")
        set_number(page, "seed", 7)
        set_number(page, "count", 2 if not TRAINED else 8)
        set_number(page, "steps", steps)
        page.locator("#generate-button").click()
        got = gallery_images(page, 2 if not TRAINED else 8)
        screenshot(page, "generate")
        page.close()
    count = len(got)
    guidance = read_capabilities(folder).guidance_scale  # the slider's start: the model's own scale
    conditions = ({"class_labels": ["dog" if not TRAINED else "3"] * count, "guidance_scale": guidance}
                  if class_model else {"batch_size": count})
    want = reference(folder, "saved", 7, count, steps=steps, **conditions)  # the page's default sampler
    np.testing.assert_array_equal(np.stack(got), np.stack(want))


def test_invalid_input_shows_the_pipelines_message(class_page):
    page = class_page
    choose(page, "class-label", "zebra")
    page.locator("#generate-button").click()
    message = page.get_by_text(re.compile(r"unknown class name 'zebra'; this model knows"))
    message.first.wait_for()
    assert "Traceback" not in page.content()
    choose(page, "class-label", "cat")  # leave the page usable for the next test


def test_progress_is_shown_and_stop_ends_the_run(class_page):
    page = class_page
    set_number(page, "steps", 200)
    set_number(page, "count", 16)
    page.locator("#generate-button").click()
    # Gradio's progress bar, fed by the pipeline's steps: "denoising", "k/200 steps".
    page.locator("#gallery").get_by_text(re.compile(r"\d+/200 steps")).first.wait_for()
    page.locator("#stop-button").click()
    page.wait_for_timeout(1000)
    assert page.locator("#gallery img").count() == 0
    set_number(page, "steps", STEPS)
    set_number(page, "count", 1)
    page.locator("#generate-button").click()
    assert len(gallery_images(page, 1)) == 1  # the pipeline is free again
