"""`ldm sample`: grids and single images from a saved pipeline, seeds, scheduler choice, clear errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from test_pipeline import tiny_pipeline

from ldm.cli import main
from ldm.cli.common import SCHEDULER_NAMES, TIMESTEP_SPACINGS
from ldm.images import grid_shape
from ldm.pipelines import LatentDiffusionPipeline
from ldm.schedulers import CONSISTENCY_SCHEDULERS, FLOW_SCHEDULERS, SCHEDULERS, make_scheduler
from ldm.schedulers import TIMESTEP_SPACINGS as SPACINGS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny pipeline: 16×16 RGB images from 4×8×8 latents."""
    path = tmp_path_factory.mktemp("cli") / "model"
    tiny_pipeline(channels=3).save_pretrained(path)
    return path


def run_sample(model_dir, out, *extra: str) -> int:
    argv = ["sample", "--model", str(model_dir), "--steps", "3", "--seed", "10", "--out", str(out), "--device", "cpu"]
    return main([*argv, *extra])


def test_scheduler_names_match_the_mapping():
    assert set(SCHEDULER_NAMES) == set(SCHEDULERS)
    assert TIMESTEP_SPACINGS == SPACINGS


def test_scheduler_names_set_their_algorithm():
    """dpm++ and dpm++sde share a class: each name sets its algorithm, whatever config it is built from."""
    sde = make_scheduler("dpm++sde", DDPMScheduler().config)
    assert sde.config.algorithm_type == "sde-dpmsolver++"
    assert make_scheduler("dpm++", sde.config).config.algorithm_type == "dpmsolver++"


# flow: tests/test_flow*; lcm (consistency students, stepping on their own grid): tests/test_distill.py
@pytest.mark.parametrize("name", [n for n in SCHEDULER_NAMES if n not in FLOW_SCHEDULERS + CONSISTENCY_SCHEDULERS])
def test_timestep_spacing_decides_the_first_sampling_step(name):
    """With 5 of 1000 steps, `leading` never starts at t = T-1; `trailing` and `linspace` do."""
    base = DDPMScheduler(num_train_timesteps=1000).config  # the training scheduler a pipeline is saved from
    first = {}
    for spacing in SPACINGS:
        scheduler = make_scheduler(name, base, spacing)
        scheduler.set_timesteps(5)
        assert scheduler.config.timestep_spacing == spacing
        first[spacing] = int(scheduler.timesteps[0])
    assert first["trailing"] == first["linspace"] == 999 and first["leading"] < 900
    with pytest.raises(ValueError, match="unknown timestep spacing 'middle'; choose one of: leading, trailing"):
        make_scheduler(name, base, "middle")


@pytest.mark.parametrize("n, shape", [(1, (1, 1)), (3, (2, 2)), (4, (2, 2)), (5, (2, 3)), (10, (3, 4)), (16, (4, 4))])
def test_grid_shape_is_near_square(n, shape):
    assert grid_shape(n) == shape


def test_sample_writes_grid_and_single_images(model_dir, tmp_path):
    out, single = tmp_path / "grids" / "grid.png", tmp_path / "single"
    args = ("--num_images", "3", "--batch_size", "2", "--scheduler", "ddim", "--save_images", str(single))
    assert run_sample(model_dir, out, *args) == 0

    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (32, 32, 3)  # 3 images of 16×16 on a 2×2 grid, the last cell blank
    files = sorted(p.name for p in single.iterdir())
    assert files == ["00000.png", "00001.png", "00002.png"]
    images = [np.asarray(Image.open(single / f)) for f in files]
    assert all(im.shape == (16, 16, 3) for im in images)
    np.testing.assert_array_equal(grid[:16, 16:], images[1])
    np.testing.assert_array_equal(grid[16:, :16], images[2])
    assert not grid[16:, 16:].any()

    # Image i is seed + i with the chosen scheduler, whatever the batch it was drawn in.
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(generator=[torch.Generator().manual_seed(12)], num_inference_steps=3).images[0]
    assert np.abs(np.asarray(expected).astype(int) - images[2]).max() <= 1  # batch of 1 vs 2: last-bit rounding


def test_scheduler_choice_changes_the_images(model_dir, tmp_path):
    grids = {}
    for name, spacing in (("ddim", "leading"), ("dpm++", "leading"), ("ddim", "trailing")):
        out = tmp_path / f"{name}-{spacing}.png"
        args = ("--num_images", "1", "--scheduler", name, "--timestep_spacing", spacing)
        assert run_sample(model_dir, out, *args) == 0
        grids[name, spacing] = np.asarray(Image.open(out), dtype=int)
    assert np.abs(grids["ddim", "leading"] - grids["dpm++", "leading"]).max() > 2
    assert np.abs(grids["ddim", "leading"] - grids["ddim", "trailing"]).max() > 2


def test_without_scheduler_the_saved_sampler_draws(model_dir, tmp_path):
    """The sampler saved with the pipeline (here dpm++sde, trailing) is what `ldm sample` uses unless told otherwise;
    --timestep_spacing alone changes only the spacing of the saved algorithm."""
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir)
    pipe.scheduler = make_scheduler("dpm++sde", pipe.scheduler.config, "trailing")
    pipe.save_pretrained(tmp_path / "sde")
    pipe.set_progress_bar_config(disable=True)
    grids = {}
    for name, args in (("saved", ()), ("ddim", ("--scheduler", "ddim")), ("leading", ("--timestep_spacing", "leading"))):
        assert run_sample(tmp_path / "sde", tmp_path / f"{name}.png", "--num_images", "1", *args) == 0
        grids[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=int)
    expected = np.asarray(pipe(generator=[torch.Generator().manual_seed(10)], num_inference_steps=3).images[0])
    assert np.abs(grids["saved"] - expected).max() <= 1
    assert np.abs(grids["saved"] - grids["ddim"]).max() > 2 and np.abs(grids["saved"] - grids["leading"]).max() > 2
    pipe.scheduler = make_scheduler("dpm++sde", pipe.scheduler.config, "leading")
    expected = np.asarray(pipe(generator=[torch.Generator().manual_seed(10)], num_inference_steps=3).images[0])
    assert np.abs(grids["leading"] - expected).max() <= 1


def test_folder_without_model_is_a_clear_error(tmp_path, capsys):
    assert run_sample(tmp_path, tmp_path / "grid.png") == 2
    assert "has no model_index.json" in capsys.readouterr().err

    (tmp_path / "model_index.json").write_text('{"_class_name": "LatentDiffusionPipeline", "vae": ["diffusers", ')
    assert run_sample(tmp_path, tmp_path / "grid.png") == 2
    assert "cannot load a pipeline" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


def test_missing_model_exits_nonzero_without_traceback(tmp_path):
    cmd = [sys.executable, "-m", "ldm.cli", "sample", "--model", str(tmp_path / "nope"), "--out", "x.png"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_help_does_not_import_diffusers():
    code = "import sys; from ldm.cli import build_parser; build_parser(); sys.exit('diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode == 0
