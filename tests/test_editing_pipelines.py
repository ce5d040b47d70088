"""Img2img, inpainting and super-resolution pipelines on tiny untrained models (16 px RGB, 8x8x4 latents)."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, RePaintScheduler
from helpers import tiny_unet, tiny_vae

from ldm.pipelines import (
    LatentDiffusionPipeline,
    LatentImg2ImgPipeline,
    LatentInpaintPipeline,
    LatentSuperResolutionPipeline,
)
from ldm.pipelines.image_inputs import mask_to_latent_grid
from ldm.pipelines.latents import decode, encode
from ldm.pipelines.repaint import repaint_positions

STEPS = 4


@pytest.fixture(scope="module")
def sampler() -> LatentDiffusionPipeline:
    torch.manual_seed(0)
    vae = tiny_vae()
    vae.config.scaling_factor = 0.5
    pipe = LatentDiffusionPipeline(vae=vae, unet=tiny_unet(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def superres() -> LatentSuperResolutionPipeline:
    torch.manual_seed(1)
    pipe = LatentSuperResolutionPipeline(vae=tiny_vae(), unet=tiny_unet(in_channels=4 + 3),
                                         scheduler=DDIMScheduler(), low_res_size=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def centre_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    return mask


def gen(seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(2)]


# ----- img2img -----


def test_img2img_strength_0_is_the_vae_reconstruction(sampler, images):
    pipe = LatentImg2ImgPipeline.from_pipe(sampler)
    out = pipe(image=images, strength=0.0, num_inference_steps=STEPS, output_type="pt").images
    with torch.no_grad():
        expected = (decode(sampler.vae, encode(sampler.vae, 2 * images - 1, sample=False)) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, expected)


def test_img2img_strength_1_is_sampling_from_noise(sampler, images):
    pipe = LatentImg2ImgPipeline.from_pipe(sampler)
    edited = pipe(image=images, strength=1.0, num_inference_steps=STEPS, generator=gen(), output_type="np").images
    other = pipe(image=images.flip(-1), strength=1.0, num_inference_steps=STEPS, generator=gen(),
                 output_type="np").images
    noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gen()])
    sampled = sampler(batch_size=2, latents=noise, num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_allclose(edited, sampled, atol=1e-5)
    np.testing.assert_allclose(other, sampled, atol=1e-5)  # the input no longer matters


def test_img2img_middle_strength_depends_on_input_and_seed(sampler, images):
    pipe = LatentImg2ImgPipeline.from_pipe(sampler)
    a = pipe(image=images, strength=0.5, num_inference_steps=STEPS, generator=gen(), output_type="np").images
    again = pipe(image=images, strength=0.5, num_inference_steps=STEPS, generator=gen(), output_type="np").images
    other_seed = pipe(image=images, strength=0.5, num_inference_steps=STEPS, generator=gen(9),
                      output_type="np").images
    np.testing.assert_array_equal(a, again)
    assert np.abs(a - other_seed).max() > 1e-4
    # Sigma-indexed schedulers start at the right index (set_begin_index) and give images of the same shape.
    pipe.scheduler = EulerDiscreteScheduler.from_config(sampler.scheduler.config)
    euler = pipe(image=images, strength=0.5, num_inference_steps=STEPS, generator=gen(), output_type="np").images
    assert euler.shape == (2, 16, 16, 3) and np.isfinite(euler).all()


def test_img2img_class_model_guides_towards_the_label(images):
    torch.manual_seed(0)
    pipe = LatentImg2ImgPipeline(vae=tiny_vae(), unet=tiny_unet(num_class_embeds=3 + 1), scheduler=DDIMScheduler(),
                                 class_names=["a", "b", "c"])
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="class_labels"):
        pipe(image=images, strength=0.5, num_inference_steps=STEPS)
    to_a = pipe(image=images, strength=0.8, class_labels="a", guidance_scale=3.0, num_inference_steps=STEPS,
                generator=gen(), output_type="np").images
    to_c = pipe(image=images, strength=0.8, class_labels=[2, 2], guidance_scale=3.0, num_inference_steps=STEPS,
                generator=gen(), output_type="np").images
    assert to_a.shape == (2, 16, 16, 3) and np.abs(to_a - to_c).max() > 1e-5


# ----- inpainting -----


def test_paste_back_keeps_every_unmasked_pixel_exactly(sampler, images):
    pipe = LatentInpaintPipeline.from_pipe(sampler)
    mask = centre_mask()
    kept = (mask[0, 0] == 0).numpy()
    for scheduler in (DDIMScheduler.from_config(sampler.scheduler.config),
                      EulerDiscreteScheduler.from_config(sampler.scheduler.config)):
        pipe.scheduler = scheduler
        out = pipe(image=images, mask_image=mask, num_inference_steps=STEPS, generator=gen(), output_type="np").images
        np.testing.assert_array_equal(out[:, kept], images.permute(0, 2, 3, 1).numpy()[:, kept])
        assert np.abs(out[:, ~kept] - images.permute(0, 2, 3, 1).numpy()[:, ~kept]).max() > 1e-3
    # PIL input and output: the kept pixels are the input's bytes.
    pil = LatentInpaintPipeline.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
    out = pipe(image=pil, mask_image=LatentInpaintPipeline.numpy_to_pil(mask.permute(0, 2, 3, 1).numpy()),
               num_inference_steps=STEPS, generator=gen()).images
    for got, given in zip(out, pil, strict=True):
        np.testing.assert_array_equal(np.asarray(got)[kept], np.asarray(given)[kept])
    # Without paste-back the kept pixels carry the autoencoder's reconstruction error.
    raw = pipe(image=images, mask_image=mask, num_inference_steps=STEPS, generator=gen(), paste_back=False,
               output_type="np").images
    assert np.abs(raw[:, kept] - images.permute(0, 2, 3, 1).numpy()[:, kept]).max() > 1e-3


def test_latent_mask_rule_any_masked_pixel_marks_its_cell():
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 5, 9] = 1  # one pixel, in latent cell (2, 4) of the 8x8 grid (2x2 pixels per cell)
    latent = mask_to_latent_grid(mask, (8, 8))
    assert latent.sum() == 1 and latent[0, 0, 2, 4] == 1


def test_repaint_positions_are_diffusers_repaint_schedule():
    n, jump_length, jump_n_sample = 20, 4, 3
    scheduler = RePaintScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(n, jump_length=jump_length, jump_n_sample=jump_n_sample)
    steps_left = (scheduler.timesteps // (1000 // n)).tolist()
    positions = repaint_positions(n, jump_length, jump_n_sample)
    assert positions[0] == 0 and positions[-1] == n
    assert positions[1:] == [n - t for t in steps_left]
    assert sum(b == a + 1 for a, b in itertools.pairwise(positions)) - n == sum(
        b == a - 1 for a, b in itertools.pairwise(positions))  # every jump back is walked down again


def test_resampling_runs_with_ddim_and_ddpm_and_is_refused_for_multistep(sampler, images):
    pipe = LatentInpaintPipeline.from_pipe(sampler)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        for cls in (DDIMScheduler, DDPMScheduler):
            pipe.scheduler = cls.from_config(sampler.scheduler.config)
            calls.clear()
            out = pipe(image=images, mask_image=centre_mask(), num_inference_steps=6, jump_length=2, jump_n_sample=3,
                       generator=gen(), output_type="np").images
            assert np.isfinite(out).all()
            assert len(calls) == 6 + 2 * 2 * 2  # 2 jumps x 2 repeats x 2 steps walked again
        pipe.scheduler = EulerDiscreteScheduler.from_config(sampler.scheduler.config)
        calls.clear()
        with pytest.raises(ValueError, match="jump_n_sample"):
            pipe(image=images, mask_image=centre_mask(), num_inference_steps=6, jump_n_sample=2)
        assert not calls
    finally:
        hook.remove()


# ----- super-resolution -----


def test_superres_upscales_deterministically(superres):
    low_res = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = superres(image=low_res, num_inference_steps=STEPS, generator=gen(), output_type="np").images
    b = superres(image=low_res, num_inference_steps=STEPS, generator=gen(), output_type="np").images
    c = superres(image=low_res.flip(-1), num_inference_steps=STEPS, generator=gen(), output_type="np").images
    assert a.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-5  # the low-res image conditions the result


def test_superres_and_generation_models_refuse_each_others_calls(sampler, superres, images):
    wrong = LatentSuperResolutionPipeline(vae=sampler.vae, unet=sampler.unet, scheduler=DDIMScheduler(),
                                          low_res_size=8)
    with pytest.raises(ValueError, match="not trained for super-resolution"):
        wrong(image=torch.rand(1, 3, 8, 8))
    for cls, kwargs in ((LatentDiffusionPipeline, {"batch_size": 1}),
                        (LatentImg2ImgPipeline, {"image": images}),
                        (LatentInpaintPipeline, {"image": images, "mask_image": centre_mask()})):
        with pytest.raises(ValueError, match="super-resolution model"):
            cls.from_pipe(superres)(**kwargs)


# ----- bad input: a ValueError naming the argument, before any model runs -----


@pytest.fixture
def no_model_calls(sampler, superres):
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1))
             for m in (sampler.unet, sampler.vae, superres.unet, superres.vae)]
    yield calls
    for h in hooks:
        h.remove()
    assert not calls, "a model ran before the bad input was refused"


@pytest.mark.parametrize(("kwargs", "name", "words"), [
    ({"strength": -0.1}, "strength", "[0, 1]"),
    ({"strength": 1.5}, "strength", "[0, 1]"),
    ({"image": torch.rand(1, 3, 8, 8)}, "image", "8x8"),
    ({"image": torch.rand(1, 1, 16, 16)}, "image", "1-channel"),
    ({"image": "photo.png"}, "image", "str"),
    ({"image": []}, "image", "empty"),
])
def test_img2img_bad_input(sampler, images, no_model_calls, kwargs, name, words):
    args = {"image": images, "strength": 0.5, **kwargs}
    with pytest.raises(ValueError, match=name) as error:
        LatentImg2ImgPipeline.from_pipe(sampler)(**args, num_inference_steps=STEPS)
    assert words in str(error.value)


@pytest.mark.parametrize(("mask", "words"), [
    (torch.zeros(1, 1, 16, 16), "empty"),
    (torch.ones(1, 1, 16, 16), "all white"),
    (torch.ones(1, 1, 8, 8), "8x8"),
    (torch.ones(3, 1, 16, 16), "3 masks for 2 images"),
])
def test_inpaint_bad_mask(sampler, images, no_model_calls, mask, words):
    with pytest.raises(ValueError, match="mask_image") as error:
        LatentInpaintPipeline.from_pipe(sampler)(image=images, mask_image=mask, num_inference_steps=STEPS)
    assert words in str(error.value)


def test_inpaint_bad_jump_arguments(sampler, images, no_model_calls):
    pipe = LatentInpaintPipeline.from_pipe(sampler)
    for name in ("jump_length", "jump_n_sample"):
        with pytest.raises(ValueError, match=name):
            pipe(image=images, mask_image=centre_mask(), **{name: 0})


def test_superres_bad_input(superres, no_model_calls):
    with pytest.raises(ValueError, match="image") as error:
        superres(image=torch.rand(1, 3, 16, 16))
    assert "8x8" in str(error.value)
    with pytest.raises(ValueError, match="image"):
        superres(image=torch.rand(1, 1, 8, 8))
