"""The demo's Edit and Upscale tabs through the HTTP API: tabs follow the folder, the images are the editing
pipelines' own, inpainting keeps every unpainted pixel, and bad input comes back as the pipeline's message."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from helpers import tiny_unet, tiny_vae
from PIL import Image

gr = pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed (the browser extra)")

from demo_server import serve

from ldm.demo.serving import read_capabilities
from ldm.pipelines import (
    LatentDiffusionPipeline,
    LatentImg2ImgPipeline,
    LatentInpaintPipeline,
    LatentSuperResolutionPipeline,
)

STEPS = 3
NAMES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    LatentDiffusionPipeline(vae=tiny_vae(1), unet=tiny_unet(num_class_embeds=4), scheduler=DDIMScheduler(),
                            class_names=NAMES).save_pretrained(root / "class")
    torch.manual_seed(1)
    LatentSuperResolutionPipeline(vae=tiny_vae(1), unet=tiny_unet(in_channels=5), scheduler=DDIMScheduler(),
                                  low_res_size=8).save_pretrained(root / "superres")
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 16x16 gray picture, a brush stroke over its right half (RGBA, as the editor sends its layer), and a
    picture of the wrong size."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(root / "image.png")
    stroke = np.zeros((16, 16, 4), np.uint8)
    stroke[4:12, 9:14] = (255, 0, 255, 255)
    Image.fromarray(stroke, "RGBA").save(root / "stroke.png")
    Image.fromarray(np.zeros((16, 16, 4), np.uint8), "RGBA").save(root / "nothing.png")
    Image.new("L", (20, 20), 128).save(root / "big.png")
    return root


def editor(background, layer=None) -> dict:
    files = gradio_client.handle_file
    return {"background": files(str(background)), "layers": [files(str(layer))] if layer else [], "composite": None}


def gens(seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed)]


def test_tabs_follow_the_folder(folders):
    assert read_capabilities(folders / "class").tasks == ("generate", "edit")
    assert read_capabilities(folders / "superres").tasks == ("upscale",)


@pytest.fixture(scope="module")
def class_client(folders, tmp_path_factory):
    with serve(folders / "class", tmp_path_factory.mktemp("gradio")) as (url, _):
        yield gradio_client.Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def test_img2img_and_inpainting_are_the_pipelines(class_client, folders, inputs):
    image = Image.open(inputs / "image.png")
    got = class_client.predict(editor(inputs / "image.png"), "img2img", 0.6, 4, "ddim", STEPS, "dog", 2.0,
                               api_name="/edit")
    img2img = LatentImg2ImgPipeline.from_pretrained(folders / "class")
    img2img.set_progress_bar_config(disable=True)
    want = img2img(image=[image], strength=0.6, class_labels=["dog"], guidance_scale=2.0, generator=gens(4),
                   num_inference_steps=STEPS).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(got)), np.asarray(want))

    got = np.asarray(Image.open(class_client.predict(editor(inputs / "image.png", inputs / "stroke.png"), "inpaint",
                                                     0.6, 5, "ddim", STEPS, "fox", 2.0, api_name="/edit")))
    painted = np.asarray(Image.open(inputs / "stroke.png"))[..., 3] > 0
    np.testing.assert_array_equal(got[~painted], np.asarray(image)[~painted])  # every unpainted pixel kept
    assert (got[painted] != np.asarray(image)[painted]).mean() > 0.5
    inpaint = LatentInpaintPipeline.from_pretrained(folders / "class")
    inpaint.set_progress_bar_config(disable=True)
    want = inpaint(image=[image], mask_image=[Image.fromarray(painted.astype(np.uint8) * 255)], class_labels=["fox"],
                   guidance_scale=2.0, generator=gens(5), num_inference_steps=STEPS).images[0]
    np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize(("background", "layer", "task", "message"), [
    ("image.png", "nothing.png", "inpaint", r"mask_image: a mask is empty"),
    ("big.png", None, "img2img", r"image: 20x20 image\(s\), but this model takes 16x16"),
])
def test_bad_edits_show_the_pipelines_message(class_client, inputs, background, layer, task, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        class_client.predict(editor(inputs / background, inputs / layer if layer else None), task, 0.6, 0, "ddim",
                             STEPS, "cat", 2.0, api_name="/edit")


def test_upscale_beside_bicubic(folders, tmp_path):
    low = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8), "L")
    low.save(tmp_path / "low.png")
    with serve(folders / "superres", tmp_path / "gradio") as (url, _):
        client = gradio_client.Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert "/upscale" in api and "/generate" not in api and "/edit" not in api
        bicubic, high = client.predict(gradio_client.handle_file(str(tmp_path / "low.png")), 2, "ddim", STEPS,
                                       api_name="/upscale")
        with pytest.raises(gradio_client.exceptions.AppError, match=r"image: 16x16 image\(s\), but this model takes 8x8"):
            client.predict(gradio_client.handle_file(bicubic), 2, "ddim", STEPS, api_name="/upscale")
    pipe = LatentSuperResolutionPipeline.from_pretrained(folders / "superres")
    pipe.set_progress_bar_config(disable=True)
    want = pipe(image=[low], generator=gens(2), num_inference_steps=STEPS).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(high)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(Image.open(bicubic)), np.asarray(low.resize((16, 16), Image.BICUBIC)))


def test_the_app_alone_loads_every_pipeline_from_the_folders_code(folders):
    from ldm.demo.serving import load_pipelines

    caps = read_capabilities(folders / "class")
    pipes = load_pipelines(folders / "class", caps, device="cpu")
    assert set(pipes) == {"generate", "img2img", "inpaint"}
    # diffusers' remote code (the folder's own files), not ldm's classes; one set of weights for the three tasks
    assert {type(p).__name__ for p in pipes.values()} == {"LatentDiffusionPipeline", "LatentImg2ImgPipeline",
                                                          "LatentInpaintPipeline"}
    assert all(type(p).__module__.startswith("diffusers_modules.") for p in pipes.values())
    assert pipes["img2img"].unet is pipes["generate"].unet is pipes["inpaint"].unet
    upscale = load_pipelines(folders / "superres", read_capabilities(folders / "superres"), device="cpu")
    assert list(upscale) == ["upscale"] and type(upscale["upscale"]).__module__.startswith("diffusers_modules.")
