"""Class-conditional LatentDiffusionPipeline: classifier-free guidance, class labels, bad inputs, both loading routes."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
from test_pipeline import REMOTE_CODE_SCRIPT, tiny_pipeline

from ldm.pipelines import LatentDiffusionPipeline
from ldm.pipelines.pipeline_common import DEFAULT_GUIDANCE_SCALE
from ldm.train.conditioning import ClassConditioning

STEPS = 3
NAMES = ["cat", "dog", "fox"]


def class_pipeline(class_names=NAMES, num_classes: int = 3) -> LatentDiffusionPipeline:
    """16x16 grayscale images from 4x8x8 latents; GroupNorm groups of 4 channels, so that the class embedding
    (added per channel) is not normalised away as it would be with one channel per group."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16, scaling_factor=0.5)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, num_class_embeds=num_classes + 1)
    pipe = LatentDiffusionPipeline(vae=vae, unet=unet, scheduler=DDIMScheduler(), class_names=class_names)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return class_pipeline()


def sample(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    return pipe(generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS, output_type="np",
                **kwargs).images


def reference_loop(pipe, labels: list[int], guidance_scale: float | None, seed: int = 0) -> np.ndarray:
    """DDIM written out with SEPARATE conditional and unconditional UNet calls: what the pipeline must equal."""
    latents = torch.randn((len(labels), 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    cond, null = torch.tensor(labels), torch.full((len(labels),), pipe.num_classes)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = pipe.unet(latents, t, class_labels=cond).sample
            if guidance_scale is not None:
                eps_null = pipe.unet(latents, t, class_labels=null).sample
                eps = eps_null + guidance_scale * (eps - eps_null)
            latents = scheduler.step(eps, t, latents).prev_sample
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_guidance_one_is_the_conditional_branch_alone(pipe):
    np.testing.assert_allclose(sample(pipe, class_labels=[0, 2], guidance_scale=1.0),
                               reference_loop(pipe, [0, 2], None), atol=1e-5)


def test_guidance_runs_both_branches_in_one_batched_pass(pipe):
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        guided = sample(pipe, class_labels=[0, 2], guidance_scale=3.0)
    finally:
        hook.remove()
    assert batches == [4] * STEPS  # [x_t, x_t] with classes [null, c]: one call per step
    np.testing.assert_allclose(guided, reference_loop(pipe, [0, 2], 3.0), atol=1e-4)
    # The class and the guidance both change the images.
    assert np.abs(guided - sample(pipe, class_labels=[0, 2], guidance_scale=1.0)).max() > 1e-2
    assert np.abs(sample(pipe, class_labels=[1, 1]) - sample(pipe, class_labels=[0, 0])).max() > 1e-2


def test_class_names_single_labels_and_default_guidance(pipe):
    np.testing.assert_array_equal(sample(pipe, class_labels=["dog", "fox"]), sample(pipe, class_labels=[1, 2]))
    np.testing.assert_array_equal(sample(pipe, class_labels=torch.tensor([1, 2])), sample(pipe, class_labels=[1, 2]))
    assert sample(pipe, class_labels="fox", batch_size=3).shape == (3, 16, 16, 1)
    # A model saved without its own scale samples at DEFAULT_GUIDANCE_SCALE (test_guidance_default: with one).
    np.testing.assert_array_equal(sample(pipe, class_labels=[1]),
                                  sample(pipe, class_labels=[1], guidance_scale=DEFAULT_GUIDANCE_SCALE))
    assert pipe.get_label_ids(["fox", "cat"]) == [2, 0]


def test_numpy_class_labels_are_class_ids(pipe):
    want = sample(pipe, class_labels=[1, 2])
    np.testing.assert_array_equal(sample(pipe, class_labels=np.array([1, 2])), want)
    np.testing.assert_array_equal(sample(pipe, class_labels=[np.int64(1), np.int32(2)]), want)
    np.testing.assert_array_equal(sample(pipe, class_labels=np.int64(2), batch_size=2),
                                  sample(pipe, class_labels=[2, 2]))
    for bad, message in ((np.array([1.0]), "1.0 is neither a class id nor a class name"),
                         (np.array([True]), "True is neither a class id nor a class name"),
                         (np.array([3]), r"3 \(the null class")):
        with pytest.raises(ValueError, match=message):
            sample(pipe, class_labels=bad)


@pytest.mark.parametrize("kwargs, message", [
    ({"class_labels": [3]}, r"3 \(the null class of classifier-free guidance, not a class\) is out of range"),
    ({"class_labels": [-1]}, "out of range"),
    ({"class_labels": ["wolf"]}, "unknown class name 'wolf'"),
    ({"class_labels": [True]}, "neither a class id nor a class name"),
    ({"class_labels": []}, "empty"),
    ({}, "this model is class-conditional; pass one class per image"),
    ({"class_labels": [0, 1], "batch_size": 3}, "2 labels but batch_size is 3"),
    ({"class_labels": [0], "guidance_scale": -1.0}, "guidance_scale must be >= 0"),
    ({"class_labels": [0, 1], "generator": [torch.Generator()]}, "one per image"),
])
def test_bad_class_inputs_are_rejected_before_any_work(pipe, kwargs, message):
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            pipe(num_inference_steps=STEPS, **kwargs)
    finally:
        hook.remove()
    assert calls == []


def test_unconditional_models_take_no_labels_or_guidance():
    pipe = tiny_pipeline(channels=1)
    assert pipe.num_classes is None
    for kwargs in ({"class_labels": [0]}, {"guidance_scale": 2.0}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))}: this model is unconditional"):
            pipe(num_inference_steps=1, **kwargs)
    with pytest.raises(ValueError, match="class_names: 3 names for a UNet with no classes"):
        LatentDiffusionPipeline(vae=pipe.vae, unet=pipe.unet, scheduler=pipe.scheduler, class_names=NAMES)
    with pytest.raises(ValueError, match="2 names for a UNet with 3 classes"):
        class_pipeline(class_names=["a", "b"])


def test_class_models_without_names_take_ids(tmp_path):
    pipe = class_pipeline(class_names=None)
    assert sample(pipe, class_labels=[2]).shape == (1, 16, 16, 1)
    with pytest.raises(ValueError, match="unknown class name 'cat'; this model knows ints 0..2$"):
        pipe(class_labels=["cat"], num_inference_steps=1)
    pipe.save_pretrained(tmp_path)
    assert "class_names" not in json.loads((tmp_path / "model_index.json").read_text())


def test_condition_dropout_uses_the_null_class_in_training_only():
    seen = []
    model = lambda x, t, class_labels: seen.append(class_labels) or type("Out", (), {"sample": x})
    conditioning = ClassConditioning(num_classes=10, class_names=None, cond_dropout=0.3, guidance_scale=2.0)
    labels = torch.arange(10).repeat(1000)
    torch.manual_seed(0)
    conditioning.model_output(model, torch.zeros(1), None, {"label": labels}, train=True)
    conditioning.model_output(model, torch.zeros(1), None, {"label": labels}, train=False)
    trained, evaluated = seen
    dropped = trained == 10
    assert 0.28 < dropped.float().mean() < 0.32
    assert torch.equal(trained[~dropped], labels[~dropped]) and torch.equal(evaluated, labels)


# ----- saving and both loading routes -----

# The part of test_pipeline's script that makes `ldm` unimportable, then a class-conditional call.
assert "import numpy as np, torch" in REMOTE_CODE_SCRIPT and "BlockLdm" in REMOTE_CODE_SCRIPT
BLOCK_LDM = REMOTE_CODE_SCRIPT.split("import numpy as np, torch")[0]
REMOTE_CLASS_SCRIPT = BLOCK_LDM + textwrap.dedent(
    """
    import numpy as np, torch
    from diffusers import DDIMScheduler, DiffusionPipeline

    torch.set_num_threads(1)
    model_dir, out = sys.argv[1:3]
    pipe = DiffusionPipeline.from_pretrained(model_dir, trust_remote_code=True)
    assert type(pipe).__module__.startswith("diffusers_modules."), type(pipe).__module__
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.config.class_names == ["cat", "dog", "fox"]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=["fox", 0], guidance_scale=2.5, generator=torch.Generator().manual_seed(7),
                  num_inference_steps=STEPS, output_type="np").images
    np.save(out, images)
    """
).replace("STEPS", str(STEPS))


def test_class_model_loads_with_ldm_and_where_ldm_cannot_be_imported(pipe, tmp_path):
    saved = tmp_path / "class-ldm"
    pipe.save_pretrained(saved)
    assert json.loads((saved / "model_index.json").read_text())["class_names"] == NAMES
    assert (saved / "guidance.py").is_file()
    loaded = LatentDiffusionPipeline.from_pretrained(saved)
    assert type(loaded) is LatentDiffusionPipeline and loaded.class_names == NAMES and loaded.num_classes == 3
    loaded.set_progress_bar_config(disable=True)
    expected = sample(loaded, seed=7, class_labels=["fox", 0], guidance_scale=2.5)
    np.testing.assert_allclose(expected, sample(pipe, seed=7, class_labels=[2, 0], guidance_scale=2.5), atol=1e-5)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = tmp_path / "remote.npy"
    # -I: no PYTHONPATH, no user site, no script dir on sys.path; cwd is outside the repo; the blocker does the rest.
    result = subprocess.run([sys.executable, "-I", "-c", REMOTE_CLASS_SCRIPT, str(saved), str(out)], check=False,
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "modules" / "diffusers_modules" / "local" / "guidance.py").is_file()
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
