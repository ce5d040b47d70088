"""LatentDiffusionPipeline and ldm.pipelines.latents: outputs, determinism, schedulers, and the two loading contracts."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

import ldm
from ldm.pipelines import LatentDiffusionPipeline
from ldm.pipelines.latents import decode, encode, measure_scaling_factor
from ldm.schedulers import SCHEDULERS, make_scheduler, names_for

STEPS = 4  # denoising steps in these tests: enough to exercise multistep schedulers, cheap on CPU
# Weights loaded from safetensors sit at other memory alignments than freshly built ones, and CPU kernels then round
# differently in the last bits (~1e-6); a different seed changes images by ~1e-1.
ATOL = 1e-5


def tiny_pipeline(channels: int = 3, scheduler=None) -> LatentDiffusionPipeline:
    """16×16 images ↔ 4×8×8 latents, (32, 64) blocks: builds in well under a second."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
        scaling_factor=0.5,
    )
    unet = UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    )
    pipe = LatentDiffusionPipeline(vae=vae, unet=unet, scheduler=scheduler or DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_np(pipe, seed: int = 0, batch_size: int = 2, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        batch_size=batch_size, generator=generator, num_inference_steps=STEPS, output_type="np", **kwargs
    ).images


def with_scheduler(pipe: LatentDiffusionPipeline, scheduler) -> LatentDiffusionPipeline:
    """A pipeline sharing `pipe`'s models with another scheduler (module-scoped fixtures stay untouched)."""
    new = LatentDiffusionPipeline(vae=pipe.vae, unet=pipe.unet, scheduler=scheduler)
    new.set_progress_bar_config(disable=True)
    return new


@pytest.fixture(scope="module", params=[1, 3], ids=["gray", "rgb"])
def pipe(request):
    return tiny_pipeline(channels=request.param)


@pytest.fixture(scope="module")
def rgb_pipe():
    return tiny_pipeline(channels=3)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, rgb_pipe):
    path = tmp_path_factory.mktemp("saved") / "tiny-ldm"
    rgb_pipe.save_pretrained(path)
    return path


# ----- outputs -----


def test_output_types_shapes_and_ranges(pipe):
    channels = pipe.vae.config.in_channels
    pt = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="pt")
    assert isinstance(pt.images, torch.Tensor) and pt.images.shape == (2, channels, 16, 16)
    arr = sample_np(pipe)
    assert arr.shape == (2, 16, 16, channels) and arr.dtype == np.float32
    assert arr.min() >= 0.0 and arr.max() <= 1.0 and arr.std() > 0
    np.testing.assert_allclose(arr, pt.images.permute(0, 2, 3, 1).numpy())

    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS).images
    assert len(images) == 2
    assert images[0].mode == ("L" if channels == 1 else "RGB") and images[0].size == (16, 16)
    pixels = np.asarray(images[0]).reshape(16, 16, channels)
    np.testing.assert_array_equal(pixels, (arr[0] * 255).round().astype(np.uint8))

    (tuple_images,) = pipe(num_inference_steps=1, output_type="np", return_dict=False)
    assert tuple_images.shape == (1, 16, 16, channels)


def test_bad_arguments_are_rejected(rgb_pipe):
    with pytest.raises(ValueError, match="output_type"):
        rgb_pipe(num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="expected"):
        rgb_pipe(batch_size=2, num_inference_steps=1, latents=torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="one per image"):
        rgb_pipe(batch_size=2, num_inference_steps=1, generator=[torch.Generator()])


def test_step_callback_sees_every_step_and_can_replace_the_latents(rgb_pipe):
    seen = []

    def record(pipe, step, timestep, callback_kwargs):
        seen.append((step, int(timestep), callback_kwargs["latents"].clone()))
        return {}

    plain = sample_np(rgb_pipe, seed=3)
    np.testing.assert_array_equal(sample_np(rgb_pipe, seed=3, callback_on_step_end=record), plain)
    assert [s for s, _, _ in seen] == list(range(STEPS))
    assert [t for _, t, _ in seen] == rgb_pipe.scheduler.timesteps.tolist()
    # The latents after the last step are what the VAE decodes.
    np.testing.assert_allclose(decode_np(rgb_pipe, seen[-1][2]), plain, atol=ATOL)

    def zero_at_the_end(pipe, step, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step == STEPS - 1 else {}

    zeroed = sample_np(rgb_pipe, seed=3, callback_on_step_end=zero_at_the_end)
    np.testing.assert_allclose(zeroed, decode_np(rgb_pipe, torch.zeros(2, 4, 8, 8)), atol=ATOL)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        rgb_pipe(num_inference_steps=1, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])


def decode_np(pipe, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        images = decode(pipe.vae, latents)
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


# ----- determinism -----


def test_same_seed_same_images_different_seed_different(rgb_pipe):
    a, b, c = sample_np(rgb_pipe, seed=1), sample_np(rgb_pipe, seed=1), sample_np(rgb_pipe, seed=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


def test_per_image_generators_make_images_independent_of_batch(rgb_pipe):
    # DDPM draws fresh noise at every step, so this also checks that `generator` reaches `scheduler.step`.
    pair = rgb_pipe(
        batch_size=2,
        generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)],
        num_inference_steps=STEPS,
        output_type="np",
    ).images
    single = sample_np(rgb_pipe, seed=6, batch_size=1)
    np.testing.assert_allclose(pair[1], single[0], atol=ATOL)


def test_latents_argument_replaces_the_generator(rgb_pipe):
    # DDIM with eta=0 draws no noise after x_T, so the images depend on the initial latents only.
    pipe = with_scheduler(rgb_pipe, DDIMScheduler())
    noise = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    given = pipe(batch_size=2, latents=noise, num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_array_equal(given, sample_np(pipe, seed=3))


# ----- schedulers -----


@pytest.mark.parametrize("name", sorted(names_for("ddpm")))  # flow samplers: tests/test_flow_pipelines.py
def test_every_scheduler_runs(rgb_pipe, name):
    pipe = with_scheduler(rgb_pipe, make_scheduler(name, rgb_pipe.scheduler.config))
    assert type(pipe.scheduler) is SCHEDULERS[name]
    arr = sample_np(pipe)
    assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0
    np.testing.assert_array_equal(arr, sample_np(pipe))


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_unet_input_has_unit_variance_for_sigma_schedulers(rgb_pipe, spacing):
    # Euler starts from x_T ~ N(0, σ_0²), σ_0 the first σ of the sampling timesteps (init_noise_sigma ≈ 14.6 for
    # t = T-1), and feeds the UNet x_t / sqrt(σ² + 1) (scale_model_input); forgetting either gives the UNet inputs
    # of std ≈ 14.6 or ≈ 0.07 at the first step. With leading spacing σ_0 lies below the training σ_max, so the
    # timesteps must be set before the noise is scaled.
    pipe = with_scheduler(rgb_pipe, make_scheduler("euler", rgb_pipe.scheduler.config, spacing))
    assert pipe.scheduler.init_noise_sigma > 10
    stds = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: stds.append(args[0].std().item()))
    try:
        sample_np(pipe, batch_size=4)
    finally:
        hook.remove()
    assert 0.8 < stds[0] < 1.2


def test_eta_reaches_ddim_only_when_accepted(rgb_pipe):
    pipe = with_scheduler(rgb_pipe, DDIMScheduler())
    assert np.abs(sample_np(pipe, eta=0.0) - sample_np(pipe, eta=1.0)).max() > 1e-3
    unipc = with_scheduler(rgb_pipe, make_scheduler("unipc", {}))
    np.testing.assert_array_equal(sample_np(unipc, eta=0.0), sample_np(unipc, eta=1.0))  # UniPC has no eta


def test_make_scheduler_names_the_choices():
    with pytest.raises(ValueError, match="ddpm, ddim"):
        make_scheduler("heun", {})


# ----- latents -----


def test_encode_decode_apply_the_scaling_factor(rgb_pipe):
    vae = rgb_pipe.vae
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        z = encode(vae, images, sample=False)
        torch.testing.assert_close(z, posterior.mean * 0.5)
        z1 = encode(vae, images, generator=torch.Generator().manual_seed(0))
        z2 = encode(vae, images, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(z1, z2, rtol=0, atol=0)
        assert not torch.allclose(z1, z)
        torch.testing.assert_close(decode(vae, z), vae.decode(posterior.mean).sample)


def test_measure_scaling_factor(rgb_pipe):
    vae = rgb_pipe.vae.train()
    images = torch.rand(12, 3, 16, 16) * 2 - 1
    batches = [images[:4], images[4:8], images[8:]]
    factor = measure_scaling_factor(vae, batches, num_samples=6)
    assert vae.training  # mode restored
    # The same 6 images as dict batches give the same number; all 12 give another one.
    assert factor == pytest.approx(measure_scaling_factor(vae, [{"pixel_values": images[:6]}], num_samples=6))
    with torch.no_grad():
        z = vae.eval().encode(images[:6]).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    vae.train()
    assert factor == pytest.approx(1 / z.double().std(unbiased=False).item(), rel=1e-6)
    assert factor != pytest.approx(measure_scaling_factor(vae, batches, num_samples=12))
    with pytest.raises(ValueError):
        measure_scaling_factor(vae, [], num_samples=4)
    vae.eval()


# ----- saving and loading -----


def test_save_pretrained_writes_code_and_list_class_name(saved_dir):
    index = json.loads((saved_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latent_diffusion", "LatentDiffusionPipeline"]
    package = Path(ldm.__file__).parent / "pipelines"
    assert (saved_dir / "pipeline_latent_diffusion.py").read_text() == (
        package / "pipeline_latent_diffusion.py").read_text()
    assert (saved_dir / "latents.py").read_text() == (package / "latents.py").read_text()
    for name in ("vae", "unet"):
        assert (saved_dir / name / "diffusion_pytorch_model.safetensors").is_file()


def test_from_pretrained_returns_our_class_and_same_images(saved_dir, rgb_pipe, tmp_path):
    loaded = LatentDiffusionPipeline.from_pretrained(saved_dir)
    assert type(loaded) is LatentDiffusionPipeline
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample_np(loaded, seed=4), sample_np(rgb_pipe, seed=4), atol=ATOL)

    # Components come back with the classes that model_index.json names; saving again keeps the list form.
    loaded.scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    loaded.save_pretrained(tmp_path / "again")
    again = LatentDiffusionPipeline.from_pretrained(tmp_path / "again")
    assert isinstance(again.scheduler, DDIMScheduler) and isinstance(again.vae, AutoencoderKL)
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["_class_name"][0] == "pipeline_latent_diffusion"


def test_diffusers_refuses_folder_code_without_trust_remote_code(saved_dir):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(saved_dir)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockLdm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ldm" or name.startswith("ldm."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, BlockLdm())
    try:
        import ldm
    except ImportError:
        pass
    else:
        sys.exit("ldm is importable: the test would prove nothing")

    import numpy as np, torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    model_dir, out = sys.argv[1:3]
    pipe = DiffusionPipeline.from_pretrained(model_dir, trust_remote_code=True)
    assert type(pipe).__module__.startswith("diffusers_modules."), type(pipe).__module__
    assert type(pipe).__name__ == "LatentDiffusionPipeline"
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(7)
    images = pipe(batch_size=2, generator=generator, num_inference_steps=STEPS, output_type="np").images
    np.save(out, images)
    """
).replace("STEPS", str(STEPS))


def test_remote_code_loads_where_ldm_cannot_be_imported(saved_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = tmp_path / "remote.npy"
    # -I: no PYTHONPATH, no user site, no script dir on sys.path; cwd is outside the repo; the blocker does the rest.
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_CODE_SCRIPT, str(saved_dir), str(out)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # diffusers copied the relatively imported latents.py beside the module
    assert (tmp_path / "modules" / "diffusers_modules" / "local" / "latents.py").is_file()
    local = LatentDiffusionPipeline.from_pretrained(saved_dir)
    local.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(np.load(out), sample_np(local, seed=7), atol=ATOL)


def test_push_to_hub_uploads_the_code(rgb_pipe, monkeypatch):
    from diffusers.utils import hub_utils

    monkeypatch.setattr(hub_utils, "create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    card = SimpleNamespace(save=lambda path: Path(path).write_text("card"))
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *args, **kwargs: card)
    monkeypatch.setattr(hub_utils, "populate_model_card", lambda model_card, *args, **kwargs: model_card)
    uploaded = {}

    def fake_upload(self, working_dir, repo_id, **kwargs):
        uploaded["files"] = set(os.listdir(working_dir))
        uploaded["index"] = json.loads(Path(working_dir, "model_index.json").read_text())

    monkeypatch.setattr(LatentDiffusionPipeline, "_upload_folder", fake_upload)
    rgb_pipe.push_to_hub("someone/tiny-ldm")
    assert {"pipeline_latent_diffusion.py", "latents.py", "model_index.json", "vae", "unet", "scheduler"} <= uploaded["files"]
    assert uploaded["index"]["_class_name"] == ["pipeline_latent_diffusion", "LatentDiffusionPipeline"]
