"""Every pipeline on flow-matching models (diffusion.objective: flow), or its clear refusal.

The check that needs no trained model: a network that returns the exact velocity field of one data point x*,
v(x_σ, σ) = ε − x* = (x_σ − x*)/σ, makes any correct flow sampler land on x* from any start. A pipeline that starts
from the wrong noise scale, feeds the network another σ than the sampler steps with, or loses its place in the σ grid
(RePaint's jumps) misses x*. Both loading routes are checked at the end, the second where ldm cannot be imported."""

import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils.torch_utils import randn_tensor
from helpers import tiny_text_models, tiny_unet, tiny_vae
from test_class_conditioning import BLOCK_LDM

from ldm.objectives import flow
from ldm.pipelines import (
    LatentDiffusionPipeline,
    LatentImg2ImgPipeline,
    LatentInpaintPipeline,
    LatentSuperResolutionPipeline,
)
from ldm.pipelines.image_inputs import mask_to_latent_grid
from ldm.pipelines.latents import encode
from ldm.pipelines.repaint import repaint_positions
from ldm.pipelines.text_to_image import make_text_pipeline
from ldm.schedulers import FLOW_SCHEDULERS, make_scheduler

T, SHIFT = 1000, 3.0  # a shift other than 1, so that a sampler that ignored it would miss


def flow_scheduler(name: str = "flow-euler"):
    return make_scheduler(name, flow.build_flow_scheduler(T, SHIFT).config)


def steer(network, target: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
    """Make `network` the exact velocity field of the data point `target` (its first channels are the latents; a
    guided batch holds them twice); returns the (timestep, latents) of every call, as they were given."""
    calls = []

    def forward(sample, timestep, *args, return_dict=True, **kwargs):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[0]
        x = sample[:, :target.shape[1]]
        calls.append((t.item(), x.clone()))
        goal = target.repeat(x.shape[0] // target.shape[0], 1, 1, 1)
        v = (x - goal) / (t / T)  # σ = t / T: the timestep a flow scheduler passes is σ·T
        return UNet2DOutput(sample=v) if return_dict else (v,)

    network.forward = forward
    return calls


def gens(n: int = 2) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(n)]


def latents_like(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


IMAGE = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", FLOW_SCHEDULERS)
@pytest.mark.parametrize("guided", [False, True])
def test_generation_lands_on_the_exact_fields_point(name, guided):
    """Unconditional, and class-conditional with guidance (both branches see the same field): the samples are the
    decoded x*, and the network was asked at exactly the sampler's σ·T."""
    torch.manual_seed(0)
    pipe = LatentDiffusionPipeline(vae=tiny_vae(), unet=tiny_unet(num_class_embeds=3 + 1 if guided else None),
                                   scheduler=flow_scheduler(name), class_names=["a", "b", "c"] if guided else None)
    pipe.set_progress_bar_config(disable=True)
    target = latents_like(1)
    calls = steer(pipe.unet, target)
    condition = {"class_labels": ["a", 2], "guidance_scale": 3.0} if guided else {"batch_size": 2}
    images = pipe(**condition, num_inference_steps=4, generator=gens(), output_type="pt").images
    torch.testing.assert_close(images, pipe.decode_latents(target), atol=1e-5, rtol=0)
    assert [t for t, _ in calls] == pytest.approx(pipe.scheduler.timesteps.tolist())
    assert calls[0][1].shape[0] == (4 if guided else 2)  # guidance: one batched pass over [x, x]
    # The sampler starts from unit noise (no init_noise_sigma): x_1 = ε, the generator's draw.
    torch.testing.assert_close(calls[0][1][:2], randn_tensor(target.shape, generator=gens()))


@pytest.mark.parametrize("name", FLOW_SCHEDULERS)
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_noises_along_the_flow_to_the_strengths_sigma(name, strength):
    """Strength s runs the last int(s·n) steps, from x_σ = (1 − σ)·z0 + σ·ε at the first of their σ (s = 1: from
    ε alone), and still lands on the field's point."""
    torch.manual_seed(0)
    pipe = LatentImg2ImgPipeline(vae=tiny_vae(), unet=tiny_unet(), scheduler=flow_scheduler(name))
    pipe.set_progress_bar_config(disable=True)
    target = latents_like(1)
    calls = steer(pipe.unet, target)
    images = pipe(image=IMAGE, strength=strength, num_inference_steps=10, generator=gens(), output_type="pt").images
    torch.testing.assert_close(images, pipe.decode_latents(target), atol=1e-5, rtol=0)

    z0 = encode(pipe.vae, 2 * IMAGE - 1, sample=False)
    noise = randn_tensor(z0.shape, generator=gens())
    reference = flow_scheduler(name)
    reference.set_timesteps(10)
    start = (10 - int(10 * strength)) * reference.order
    sigma = reference.sigmas[start]
    assert calls[0][0] == pytest.approx(sigma.item() * T)
    assert len(calls) == len(reference.timesteps) - start
    torch.testing.assert_close(calls[0][1], flow.interpolate(z0, noise, sigma.repeat(2)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("jump_n_sample", [1, 3])
def test_inpainting_reimposes_the_known_latents_and_resamples_along_the_flow(jump_n_sample):
    """Known cells are the image's latents at the end; the generated ones land on the field's point, also after
    RePaint's jumps back up (the sampler is rewound to each jump's σ: the network is asked at the σ of every
    position that the schedule steps down from, in order)."""
    torch.manual_seed(0)
    pipe = LatentInpaintPipeline(vae=tiny_vae(), unet=tiny_unet(), scheduler=flow_scheduler())
    pipe.set_progress_bar_config(disable=True)
    target = latents_like(1)
    calls = steer(pipe.unet, target)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    images = pipe(image=IMAGE, mask_image=mask, num_inference_steps=6, jump_length=2, jump_n_sample=jump_n_sample,
                  paste_back=False, generator=gens(), output_type="pt").images

    z0 = encode(pipe.vae, 2 * IMAGE - 1, sample=False)
    latent_mask = mask_to_latent_grid(mask.expand(2, -1, -1, -1), (8, 8))
    expected = latent_mask * target + (1 - latent_mask) * z0
    torch.testing.assert_close(images, pipe.decode_latents(expected), atol=1e-5, rtol=0)
    timesteps = pipe.scheduler.timesteps
    positions = repaint_positions(6, 2, jump_n_sample)
    down = [timesteps[here].item() for here, there in itertools.pairwise(positions) if there == here + 1]
    assert [t for t, _ in calls] == pytest.approx(down)
    assert (len(down) > 6) == (jump_n_sample > 1)  # the jumps were taken


def test_inpainting_refuses_a_second_order_flow_sampler():
    pipe = LatentInpaintPipeline(vae=tiny_vae(), unet=tiny_unet(), scheduler=flow_scheduler("flow-heun"))
    mask = torch.ones(1, 1, 16, 16)
    mask[..., :4, :] = 0
    for jump_n_sample in (1, 2):
        with pytest.raises(ValueError, match=r"FlowMatchHeunDiscreteScheduler is of order 2.*flow-euler"):
            pipe(image=IMAGE, mask_image=mask, num_inference_steps=4, jump_length=1, jump_n_sample=jump_n_sample)


@pytest.mark.parametrize("name", FLOW_SCHEDULERS)
def test_superresolution_lands_on_the_exact_fields_point(name):
    torch.manual_seed(0)
    pipe = LatentSuperResolutionPipeline(vae=tiny_vae(), unet=tiny_unet(in_channels=7), scheduler=flow_scheduler(name),
                                         low_res_size=8)
    pipe.set_progress_bar_config(disable=True)
    target = latents_like(1)
    calls = steer(pipe.unet, target)
    images = pipe(image=IMAGE[:, :, ::2, ::2], num_inference_steps=4, generator=gens(), output_type="pt").images
    torch.testing.assert_close(images, pipe.decode_latents(target), atol=1e-5, rtol=0)
    assert [t for t, _ in calls] == pytest.approx(pipe.scheduler.timesteps.tolist())


@pytest.mark.parametrize("name", FLOW_SCHEDULERS)
def test_text_model_is_ldms_pipeline_and_lands_with_guidance(name, tmp_path):
    """StableDiffusionPipeline scales its first latents by init_noise_sigma, which flow schedulers lack: a flow text
    model is ldm's LatentTextToImagePipeline (Stable Diffusion's loop, unit starting noise), guided as usual."""
    tokenizer, encoder, vae, unet = tiny_text_models(["a 3", "a 5"], tmp_path / "tokenizer")
    pipe = make_text_pipeline(vae, unet, encoder, tokenizer, flow_scheduler(name), guidance_scale=2.0)
    assert type(pipe).__name__ == "LatentTextToImagePipeline"
    pipe.set_progress_bar_config(disable=True)
    target = latents_like(1)
    calls = steer(pipe.unet, target)
    latents = pipe(["a 3", "a 5"], guidance_scale=2.0, num_inference_steps=4, generator=gens(),
                   output_type="latent").images
    torch.testing.assert_close(latents, target, atol=1e-5, rtol=0)
    assert calls[0][1].shape[0] == 4  # classifier-free guidance: [unconditional, conditional]
    torch.testing.assert_close(calls[0][1][:2], randn_tensor(target.shape, generator=gens()))


REMOTE_FLOW_SCRIPT = BLOCK_LDM + textwrap.dedent(
    """
    import numpy as np, torch
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    torch.set_num_threads(1)
    generation, superres, text, out = sys.argv[1:5]
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(2)]

    def load(folder, **kwargs):
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, **kwargs)
        assert type(pipe).__module__.startswith("diffusers_modules."), type(pipe).__module__
        assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.shift == SHIFT
        pipe.set_progress_bar_config(disable=True)
        return pipe

    results = {
        "generate": load(generation)(class_labels=["a", 2], guidance_scale=3.0, num_inference_steps=3,
                                     generator=gens(), output_type="np").images,
        "img2img": load(generation, custom_pipeline="pipeline_latent_img2img")(
            image=image, strength=0.6, class_labels="b", num_inference_steps=4, generator=gens(),
            output_type="np").images,
        "inpaint": load(generation, custom_pipeline="pipeline_latent_inpaint")(
            image=image, mask_image=mask, class_labels="c", num_inference_steps=4, jump_length=1, jump_n_sample=2,
            generator=gens(), output_type="np").images,
        "superres": load(superres)(image=image[:, :, ::2, ::2], num_inference_steps=3, generator=gens(),
                                   output_type="np").images,
        "text": load(text)(["a 3", "a 5"], guidance_scale=2.0, num_inference_steps=3, generator=gens(),
                           output_type="np").images,
    }
    np.savez(out, **results)
    """
).replace("SHIFT", repr(SHIFT))


def test_flow_folders_load_both_ways_with_the_same_images(tmp_path):
    """`LatentDiffusionPipeline.from_pretrained` (and the other ldm classes) with ldm; diffusers' DiffusionPipeline
    with the folder's code (noising.py travels with it) in a process that cannot import ldm: the same images."""
    torch.manual_seed(0)
    LatentDiffusionPipeline(vae=tiny_vae(), unet=tiny_unet(num_class_embeds=4), scheduler=flow_scheduler(),
                            class_names=["a", "b", "c"]).save_pretrained(tmp_path / "generation")
    LatentSuperResolutionPipeline(vae=tiny_vae(), unet=tiny_unet(in_channels=7), scheduler=flow_scheduler(),
                                  low_res_size=8).save_pretrained(tmp_path / "superres")
    tokenizer, encoder, vae, unet = tiny_text_models(["a 3", "a 5"], tmp_path / "tokenizer")
    make_text_pipeline(vae, unet, encoder, tokenizer, flow_scheduler(), guidance_scale=2.0).save_pretrained(
        tmp_path / "text")
    assert (tmp_path / "generation" / "noising.py").is_file() and (tmp_path / "text" / "noising.py").is_file()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = tmp_path / "remote.npz"
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_FLOW_SCRIPT, *(str(tmp_path / n) for n in ("generation", "superres", "text")),
         str(out)], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = np.load(out)

    from ldm.pipelines.loading import load_pipeline

    def local(cls, folder):
        pipe = cls.from_pretrained(tmp_path / folder)
        assert type(pipe) is cls and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert pipe.scheduler.config.shift == SHIFT
        pipe.set_progress_bar_config(disable=True)
        return pipe

    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    expected = {
        "generate": local(LatentDiffusionPipeline, "generation")(
            class_labels=["a", 2], guidance_scale=3.0, num_inference_steps=3, generator=gens(), output_type="np"),
        "img2img": local(LatentImg2ImgPipeline, "generation")(
            image=IMAGE, strength=0.6, class_labels="b", num_inference_steps=4, generator=gens(), output_type="np"),
        "inpaint": local(LatentInpaintPipeline, "generation")(
            image=IMAGE, mask_image=mask, class_labels="c", num_inference_steps=4, jump_length=1, jump_n_sample=2,
            generator=gens(), output_type="np"),
        "superres": local(LatentSuperResolutionPipeline, "superres")(
            image=IMAGE[:, :, ::2, ::2], num_inference_steps=3, generator=gens(), output_type="np"),
    }
    text = load_pipeline(tmp_path / "text")
    text.set_progress_bar_config(disable=True)
    assert type(text).__name__ == "LatentTextToImagePipeline"
    expected["text"] = text(["a 3", "a 5"], guidance_scale=2.0, num_inference_steps=3, generator=gens(),
                            output_type="np")
    for name, output in expected.items():
        np.testing.assert_allclose(remote[name], output.images, atol=1e-5, err_msg=name)
