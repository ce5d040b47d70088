"""What the editing pipelines do to the latents at each step, read off the scheduler's own calls (tiny untrained
models, 16 px RGB, 8x8x4 latents): inpainting re-imposes the known latents at every step, noised to that step's
level; img2img runs the last `strength` of the schedule from the image latents noised to the first timestep run.

The output images cannot show either: paste-back hides everything outside the mask, and an untrained UNet gives
plausible-looking noise whichever timesteps it runs. So each test wraps `scheduler.step` to record the latents it is
given and the timestep, and replays the pipeline's generator to know the noise it drew. The draws, in order:
img2img: the noise of the starting latents; inpainting: the starting noise, then one draw per step for the known
cells (DDIM with eta=0, Euler without churn and DPM-Solver++ draw nothing in `step`).
"""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from helpers import tiny_unet, tiny_vae

from ldm.pipelines import LatentImg2ImgPipeline, LatentInpaintPipeline
from ldm.pipelines.image_inputs import mask_to_latent_grid
from ldm.pipelines.latents import encode

STEPS = 10
SEED = 0
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),  # alpha-bar-indexed, x_t = sqrt(a) z0 + sqrt(1 - a) eps
    "euler": (EulerDiscreteScheduler, {}),  # sigma-indexed, x = z0 + sigma eps
    "dpm++karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),  # sigma-indexed, multistep
}


@pytest.fixture(scope="module")
def components() -> dict:
    torch.manual_seed(0)
    vae = tiny_vae()
    vae.config.scaling_factor = 0.5
    return {"vae": vae, "unet": tiny_unet(), "scheduler": DDIMScheduler()}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def make_scheduler(name: str):
    cls, options = SCHEDULERS[name]
    return cls.from_config(DDIMScheduler().config, **options)


def record_steps(pipe) -> list[tuple[int, torch.Tensor]]:
    """(timestep, latents given to `step`) of every scheduler step of the next runs, and the decoded latents last
    (timestep None)."""
    calls = []
    step, decode_latents = pipe.scheduler.step, pipe.decode_latents

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        calls.append((int(timestep), sample.clone()))
        return step(model_output, timestep, sample, *args, **kwargs)

    def recording_decode(latents):
        calls.append((None, latents.clone()))
        return decode_latents(latents)

    pipe.scheduler.step, pipe.decode_latents = recording_step, recording_decode  # instance attributes
    return calls


def image_latents(vae, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encode(vae, 2 * images - 1, sample=False)


def noised(name: str, z0: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
    """z0 at the noise level of `timestep` of a full STEPS schedule: a fresh scheduler's own `add_noise`."""
    scheduler = make_scheduler(name)
    scheduler.set_timesteps(STEPS)
    return scheduler.add_noise(z0, noise, torch.tensor([timestep] * z0.shape[0]))


# ----- inpainting: the known latents at every step -----


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_inpainting_reimposes_the_known_latents_at_every_step(components, images, name):
    pipe = LatentInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(name)
    calls = record_steps(pipe)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 2:9, 7:14] = 1  # latent cells 1..4 x 3..6 (any masked pixel marks its cell)
    pipe(image=images, mask_image=mask, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
         output_type="pt")

    z0 = image_latents(components["vae"], images)
    known = 1 - mask_to_latent_grid(mask, (8, 8))  # 1 where the image's latents are imposed
    assert 0 < known.mean() < 1
    timesteps = make_scheduler(name)
    timesteps.set_timesteps(STEPS)
    assert [t for t, _ in calls] == [*timesteps.timesteps.tolist(), None]  # every step once, then decoding

    replay = torch.Generator().manual_seed(SEED)
    start = torch.randn(z0.shape, generator=replay)
    for i, (t, latents) in enumerate(calls[:-1]):
        # Outside the mask: z0 noised to this step's level with the draw made for it; inside: the sampler's own.
        expected = noised(name, z0, torch.randn(z0.shape, generator=replay), t)
        torch.testing.assert_close(latents * known, expected * known, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, i=i: f"step {i}: known latents not re-imposed: {m}")
        fill = (known[:, 0] == 0).expand(z0.shape[0], -1, -1)
        assert (latents - expected).abs().amax(dim=1)[fill].min() > 1e-3, f"step {i}: the cells to fill are imposed"
        if i == 0:  # the cells to fill start from the first draw, as sampling from noise starts
            torch.testing.assert_close(latents * (1 - known), start * timesteps.init_noise_sigma * (1 - known))
    # After the last step the known cells are the clean image latents, exactly.
    torch.testing.assert_close(calls[-1][1] * known, z0 * known, rtol=0, atol=0)


# ----- img2img: strength -> timesteps and the starting noise level -----


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_img2img_strength_runs_the_last_timesteps_from_the_image_noised_to_the_first(components, images, name):
    strength = 0.6
    pipe = LatentImg2ImgPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(name)
    calls = record_steps(pipe)
    pipe(image=images, strength=strength, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
         output_type="pt")

    full = make_scheduler(name)
    full.set_timesteps(STEPS)
    run = int(STEPS * strength)  # 6 of the 10 steps: the LAST six, the noisiest four are skipped
    assert [t for t, _ in calls] == [*full.timesteps[STEPS - run:].tolist(), None]

    # The starting latents: z0 noised to the first timestep run, with the generator's first draw.
    z0 = image_latents(components["vae"], images)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(SEED))
    first_t, start = calls[0]
    torch.testing.assert_close(start, noised(name, z0, noise, first_t), rtol=1e-5, atol=1e-5)
    # ... which is the level of index STEPS - run of the schedule, stated without add_noise:
    if hasattr(full, "sigmas"):  # sigma-indexed: x = z0 + sigma eps, scaled by 1/sqrt(sigma^2 + 1) for DPM-Solver
        sigma = full.sigmas[STEPS - run]
        scale = 1 / (sigma**2 + 1).sqrt() if isinstance(full, DPMSolverMultistepScheduler) else 1.0
        torch.testing.assert_close(start, scale * (z0 + sigma * noise), rtol=1e-5, atol=1e-5)
    else:
        alpha_bar = full.alphas_cumprod[int(full.timesteps[STEPS - run])]
        torch.testing.assert_close(start, alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise, rtol=1e-5, atol=1e-5)

    # Each step uses its own timestep's level: the same loop written as diffusers' img2img pipelines write it.
    reference = make_scheduler(name)
    reference.set_timesteps(STEPS)
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(STEPS - run)
    latents = start
    with torch.no_grad():
        for t in reference.timesteps[STEPS - run:]:
            model_output = components["unet"](reference.scale_model_input(latents, t), t).sample
            latents = reference.step(model_output, t, latents).prev_sample
    torch.testing.assert_close(calls[-1][1], latents, rtol=1e-5, atol=1e-5)
