"""Arguments of the editing pipelines that would otherwise give wrong output silently: image tensors and arrays
outside [0, 1] (a [-1, 1] tensor, 0..255 pixels) and a RePaint jump as long as the whole schedule. Each is a
ValueError before any model runs."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from helpers import tiny_unet, tiny_vae
from PIL import Image

from ldm.pipelines import LatentImg2ImgPipeline, LatentInpaintPipeline, LatentSuperResolutionPipeline

STEPS = 4


@pytest.fixture(scope="module")
def pipes() -> dict:
    torch.manual_seed(0)
    vae = tiny_vae()
    img2img = LatentImg2ImgPipeline(vae=vae, unet=tiny_unet(), scheduler=DDIMScheduler())
    superres = LatentSuperResolutionPipeline(vae=vae, unet=tiny_unet(in_channels=4 + 3), scheduler=DDIMScheduler(),
                                             low_res_size=8)
    pipes = {"img2img": img2img, "inpaint": LatentInpaintPipeline.from_pipe(img2img), "superres": superres}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture
def no_model_calls(pipes):
    calls = []
    modules = {m for pipe in pipes.values() for m in (pipe.unet, pipe.vae)}
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in modules]
    yield calls
    for h in hooks:
        h.remove()
    assert not calls, "a model ran before the bad input was refused"


def centre_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    return mask


def run(pipes, task: str, image, **kwargs):
    extra = {"img2img": {"strength": 0.5}, "inpaint": {"mask_image": centre_mask()}, "superres": {}}[task]
    return pipes[task](image=image, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                       output_type="np", **extra, **kwargs).images


def in_range(task: str) -> torch.Tensor:
    """Two images in [0, 1] that reach both ends of the range."""
    side = 8 if task == "superres" else 16
    image = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    image[0, :, 0, 0], image[1, :, 0, 0] = 0.0, 1.0
    return image


@pytest.mark.parametrize("task", ["img2img", "inpaint", "superres"])
def test_image_tensors_outside_0_1_are_refused(pipes, no_model_calls, task):
    image = in_range(task)
    for bad, got in ((image * 2 - 1, r"\[-1, 1\]"), (image * 255, r"\[0, 255\]")):  # [-1, 1], 0..255 pixels
        with pytest.raises(ValueError, match=rf"image: values in {got}, expected \[0, 1\]"):
            run(pipes, task, bad)
        with pytest.raises(ValueError, match=r"image: values in .*expected \[0, 1\]"):  # NHWC arrays alike
            run(pipes, task, bad.permute(0, 2, 3, 1).numpy())
        with pytest.raises(ValueError, match=r"image: values in .*expected \[0, 1\]"):  # and lists of tensors
            run(pipes, task, list(bad))
    image[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"image: has NaN or infinite values; expected values in \[0, 1\]"):
        run(pipes, task, image)


@pytest.mark.parametrize("task", ["img2img", "inpaint", "superres"])
def test_images_in_0_1_and_pil_images_are_taken(pipes, task):
    image = in_range(task)
    out = run(pipes, task, image)
    pil = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in image]
    assert out.shape == run(pipes, task, pil).shape == (2, 16, 16, 3)


def test_a_jump_as_long_as_the_schedule_is_refused(pipes, no_model_calls):
    image = in_range("inpaint")
    for jump_length in (STEPS, STEPS + 3):  # jumps start below n - jump_length: none would be made
        with pytest.raises(ValueError, match=rf"jump_length={jump_length} .* num_inference_steps={STEPS}"):
            run(pipes, "inpaint", image, jump_length=jump_length, jump_n_sample=2)


def test_jump_length_matters_only_when_resampling(pipes):
    image = in_range("inpaint")
    # The default jump_length (10) exceeds STEPS, which is fine without resampling (jump_n_sample=1)...
    assert run(pipes, "inpaint", image).shape == (2, 16, 16, 3)
    # ...and a jump shorter than the schedule resamples.
    calls = []
    hook = pipes["inpaint"].unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        run(pipes, "inpaint", image, jump_length=STEPS - 1, jump_n_sample=2)
    finally:
        hook.remove()
    assert len(calls) == STEPS + STEPS - 1  # one jump back of STEPS - 1 steps, walked down again
