"""`ldm distill` (latent consistency distillation, ldm/distill/): the boundary conditions, the solver step and the
consistency target against diffusers' LCMScheduler and DDIMScheduler and against a tiny class teacher computed by
hand; the distillation through the command line at tiny size, resumed exactly after a crash, from the teacher's latent
cache without running the autoencoder; the student's folder loaded both ways and used by ldm sample/eval/sweep and
the demo; a text student as a stock Stable Diffusion folder; and each bad input refused before any work."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, LCMScheduler
from helpers import REPO, assert_same_checkpoint, run, saved_tiny_vae, tiny_config, tiny_unet, tiny_vae
from safetensors.torch import load_file
from test_class_conditioning import BLOCK_LDM

from ldm.cli import main
from ldm.config import ConfigError, load_config
from ldm.distill.consistency import ConsistencyDistillation, boundary_scalings, skip_grid
from ldm.distill.task import ConsistencyPair, DistillTask, sampling_conditioning
from ldm.distill.teacher import Teacher
from ldm.pipelines import LatentDiffusionPipeline
from ldm.pipelines.loading import load_pipeline
from ldm.train import latent_cache

TINY = str(REPO / "configs/tiny.yaml")


# ----- the math, against diffusers' schedulers -----

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_grid_boundary_conditions_and_consistency_function_are_lcm_schedulers(prediction_type):
    lcm = LCMScheduler(beta_start=0.0015, beta_end=0.0195, original_inference_steps=50, prediction_type=prediction_type)
    grid = skip_grid(1000, 20)
    assert grid.tolist() == list(range(19, 1000, 20))
    lcm.set_timesteps(50)
    assert lcm.timesteps.flip(0).tolist() == grid.tolist()  # the student is sampled on the grid it learned on
    t = torch.tensor([0, 1, 19, 999])
    c_skip, c_out = boundary_scalings(t, 10.0)
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)  # f(x, 0) = x
    for i, step in enumerate(t.tolist()):
        reference = lcm.get_scalings_for_boundary_condition_discrete(step)
        assert (c_skip[i].item(), c_out[i].item()) == pytest.approx(reference, rel=1e-6)

    lcd = ConsistencyDistillation(lcm.alphas_cumprod, 20, prediction_type)
    generator = torch.Generator().manual_seed(0)
    x, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    assert torch.equal(lcd.consistency(output, x, torch.zeros(2, dtype=torch.long)), x)  # the boundary, exactly
    lcm.set_timesteps(4)
    for step in lcm.timesteps.tolist():  # LCMScheduler.step's `denoised` is the same f at every step of its grid
        denoised = lcm.step(output, step, x, generator=generator).denoised
        torch.testing.assert_close(lcd.consistency(output, x, torch.full((2,), step)), denoised, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_solver_step_is_ddims_step_down_the_skip_interval(prediction_type):
    """t_{n+1} -> t_n is DDIM's deterministic step over k timesteps; from t_1 = k - 1 it lands on t = 0 (ᾱ_0)."""
    ddim = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", set_alpha_to_one=False,
                         prediction_type=prediction_type, clip_sample=False)
    ddim.set_timesteps(10)  # T / N = k = 100: DDIM's previous timestep is t - 100
    lcd = ConsistencyDistillation(ddim.alphas_cumprod, 100, prediction_type)
    generator = torch.Generator().manual_seed(1)
    x, output = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    for start in (99, 499, 999):
        end = torch.tensor([max(start - 100, 0)])
        expected = ddim.step(output, start, x, eta=0.0).prev_sample
        torch.testing.assert_close(lcd.solver_step(output, x, torch.tensor([start]), end), expected, rtol=1e-5,
                                   atol=1e-5)


def tiny_class_teacher(guidance_scale: float = 2.0) -> LatentDiffusionPipeline:
    torch.manual_seed(0)
    scheduler = DDPMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False)
    return LatentDiffusionPipeline(vae=tiny_vae(1), unet=tiny_unet(num_class_embeds=3 + 1), scheduler=scheduler,
                                   class_names=["a", "b", "c"], guidance_scale=guidance_scale)


def test_consistency_target_of_a_guided_class_teacher_by_hand(tmp_path):
    """compute_loss = ‖f_θ(x_{t_{n+1}}) − f_θ⁻(DDIM step of ε(∅) + s (ε(c) − ε(∅)))‖², rebuilt from diffusers'
    schedulers and two separate teacher passes; the gradient reaches the student only, and the target follows it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = tiny_config(tmp_path, **{"distill.skip_interval": 100})
    pipe = tiny_class_teacher()
    teacher = Teacher(pipe)
    assert teacher.guidance_scale == 2.0  # the teacher's own
    task = DistillTask(cfg, teacher, sampling_conditioning(teacher, None, None))
    pair = ConsistencyPair(teacher.denoiser, transformer=False)
    task.attach(Accelerator(cpu=True), {"model": pair})
    generator = torch.Generator().manual_seed(2)
    batch = {latent_cache.MEAN: torch.randn(3, 4, 8, 8, generator=generator),
             latent_cache.LOGVAR: torch.full((3, 4, 8, 8), -4.0), "label": torch.tensor([0, 2, 1])}
    torch.manual_seed(3)
    loss, _ = task.compute_loss(batch, 0)

    torch.manual_seed(3)  # the same draws, in compute_loss's order: posterior sample, grid points, noise
    z0 = latent_cache.sample_latents(pipe.vae, batch)
    start = skip_grid(1000, 100)[torch.randint(0, 10, (3,))]
    noise = torch.randn_like(z0)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False)
    ddim.set_timesteps(10)
    lcm = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=10)
    with torch.no_grad():
        preds, targets = [], []
        for i in range(3):
            t, label = int(start[i]), batch["label"][i:i + 1]
            x = pipe.scheduler.add_noise(z0[i:i + 1], noise[i:i + 1], torch.tensor([t]))
            cond = pipe.unet(x, t, class_labels=label).sample
            uncond = pipe.unet(x, t, class_labels=torch.tensor([3])).sample  # the null class
            x_end = ddim.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample
            end = max(t - 100, 0)
            for out, point, step, sink in ((cond, x, t, preds), (pipe.unet(x_end, end, class_labels=label).sample,
                                                               x_end, end, targets)):
                c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(step)
                alpha = lcm.alphas_cumprod[step]
                sink.append(c_skip * point + c_out * (point - (1 - alpha).sqrt() * out) / alpha.sqrt())
    expected = torch.nn.functional.mse_loss(torch.cat(preds), torch.cat(targets))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)

    loss.backward()
    assert all(p.grad is not None for p in pair.student.parameters())
    assert all(p.grad is None for p in pair.target.parameters())
    with torch.no_grad():
        for p in pair.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in pair.target.parameters()]
    task.after_optimizer_step(1)  # θ⁻ ← 0.95 θ⁻ + 0.05 θ
    for old, new, online in zip(before, pair.target.parameters(), pair.student.parameters()):
        torch.testing.assert_close(new, 0.95 * old + 0.05 * online)


# ----- through the command line: a tiny teacher, its student, a crash and an exact resume -----

def distill(*args: str) -> int:
    AcceleratorState._reset_state(reset_partial_state=True)  # each run builds its own Accelerator
    return main(["distill", "--config", TINY, *args])


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return saved_tiny_vae(tmp_path_factory.mktemp("vae") / "model")


# 24 images in batches of 8: an epoch is 3 steps, so checkpoint-4 lies inside the second epoch.
DATA = {"data.max_samples": 24}


@pytest.fixture(scope="module")
def teacher_run(vae_dir, tmp_path_factory):
    """An unconditional teacher of configs/tiny.yaml, with the latent cache its training built."""
    from ldm.train.unet import train_unet

    out = tmp_path_factory.mktemp("teacher")
    run(train_unet, tiny_config(out, **DATA, **{"denoiser.vae_path": str(vae_dir), "denoiser.train.max_steps": 4,
                                               "denoiser.train.sample_every": 0, "denoiser.train.report_to": "none",
                                               "denoiser.train.checkpointing_steps": 0}))
    return out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """Features for the evaluations (an untrained, seeded classifier: the scores' values do not matter here)."""
    from ldm.eval.classifier import ClassifierConfig, SmallCNN, save_classifier

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("classifier")
    save_classifier(SmallCNN(ClassifierConfig(channels=1, resolution=16, num_classes=10)), path)
    return path


def run_args(teacher_run, vae_dir, classifier, out, *extra):
    return ("--model", str(teacher_run / "pipeline"), "--output_dir", str(out), f"--denoiser.vae_path={vae_dir}",
            f"--denoiser.latent_cache_dir={teacher_run / 'latent_cache'}", "--data.max_samples=24",
            "--train.checkpointing_steps=2", "--train.eval_every=3", f"--denoiser.eval_features={classifier}",
            "--denoiser.eval_num_samples=8", *extra)


@pytest.fixture(scope="module")
def straight(teacher_run, vae_dir, classifier, tmp_path_factory):
    """6 distillation steps without interruption, with the autoencoder's encoder made to fail if it ran."""
    out = tmp_path_factory.mktemp("distill") / "straight"
    encode = AutoencoderKL.encode
    AutoencoderKL.encode = lambda *a, **k: pytest.fail("the autoencoder encoded images: the latent cache was not used")
    try:
        assert distill(*run_args(teacher_run, vae_dir, classifier, out)) == 0
    finally:
        AutoencoderKL.encode = encode
    return out


@pytest.mark.slow
def test_distillation_runs_on_the_spine_and_resumes_exactly(straight, teacher_run, vae_dir, classifier, tmp_path,
                                                            capsys):
    stage = straight / "distill"
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4",
                                                                          "checkpoint-6"]
    assert {p.name for p in (stage / "samples").iterdir()} == {"step-0000003.png", "step-0000006.png", "final.png"}
    assert list((stage / "logs").rglob("events.out.tfevents.*"))
    best = json.loads((stage / "best" / "metrics.json").read_text())
    assert best["steps"] == 2 and best["step"] in (3, 6)  # scored at the student's own step count
    assert load_config(stage / "config.yaml").distill.teacher == str(teacher_run / "pipeline")
    assert json.loads((stage / "summary.json").read_text())["minutes"] > 0

    resumed = tmp_path / "resumed"  # what a crash right after step 4 leaves
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "distill" / "checkpoints" / "checkpoint-6")
    shutil.rmtree(resumed / "student")
    kept = {p.name: p.stat().st_mtime_ns for p in (resumed / "distill" / "checkpoints" / "checkpoint-4").iterdir()}
    capsys.readouterr()
    assert distill(*run_args(teacher_run, vae_dir, classifier, resumed, "--train.resume_from_checkpoint=latest")) == 0
    assert "at step 4" in capsys.readouterr().out  # a resume, not a silent restart: checkpoint-4 was not rewritten
    assert kept == {p.name: p.stat().st_mtime_ns for p in (resumed / "distill" / "checkpoints" / "checkpoint-4").iterdir()}
    # Bitwise: the student, its target (both in model.safetensors), the EMA, the optimizer, the saved student.
    assert_same_checkpoint(stage / "checkpoints" / "checkpoint-6", resumed / "distill" / "checkpoints" / "checkpoint-6")
    weights = "student/unet/diffusion_pytorch_model.safetensors"
    assert (straight / weights).read_bytes() == (resumed / weights).read_bytes()
    model = load_file(stage / "checkpoints" / "checkpoint-6" / "model.safetensors")
    start = load_file(stage / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(model[k], start[k]) for k in model if k.startswith("target."))  # the target moved
    assert json.loads((resumed / "distill" / "best" / "metrics.json").read_text())["value"] == best["value"]


STUDENT_SCRIPT = BLOCK_LDM + textwrap.dedent(
    """
    import numpy as np, torch
    from diffusers import DiffusionPipeline, LCMScheduler

    torch.set_num_threads(1)
    model_dir, out = sys.argv[1:3]
    pipe = DiffusionPipeline.from_pretrained(model_dir, trust_remote_code=True)
    assert type(pipe).__module__.startswith("diffusers_modules."), type(pipe).__module__
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.config.num_inference_steps == 2
    pipe.set_progress_bar_config(disable=True)
    np.save(out, pipe(batch_size=2, generator=torch.Generator().manual_seed(7), output_type="np").images)
    """
)


@pytest.mark.slow
def test_student_loads_both_ways_with_its_own_sampler_and_steps(straight, tmp_path):
    folder = straight / "student"
    local = LatentDiffusionPipeline.from_pretrained(folder)
    local.set_progress_bar_config(disable=True)
    assert isinstance(local.scheduler, LCMScheduler) and local.default_num_inference_steps == 2
    assert local.scheduler.config.original_inference_steps == 10  # T / k = 1000 / 100
    assert "latent consistency distillation" in (folder / "README.md").read_text()
    assert json.loads((folder / "distillation.json").read_text())["grid_points"] == 10
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    remote = subprocess.run([sys.executable, "-I", "-c", STUDENT_SCRIPT, str(folder), str(tmp_path / "r.npy")],
                            check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stderr[-3000:]
    mine = local(batch_size=2, generator=torch.Generator().manual_seed(7), output_type="np").images  # 2 steps
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), mine, atol=1e-5)
    two = local(batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(two.images, mine)
    with pytest.warns(UserWarning, match="distilled for at most 10 steps"):  # more steps than it learned: warned
        more = local(batch_size=1, num_inference_steps=12, output_type="np").images
    assert more.shape == (1, 16, 16, 1) and np.isfinite(more).all()


@pytest.mark.slow
def test_commands_and_demo_use_the_student_without_new_flags(straight, teacher_run, classifier, tmp_path, capsys):
    folder = str(straight / "student")
    assert main(["sample", "--model", folder, "--num_images", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert "2 steps" in capsys.readouterr().out
    data = tmp_path / "data.yaml"
    data.write_text(Path(TINY).read_text().replace("max_samples: 256", "max_samples: 24"))
    common = ["--data", str(data), "--features", str(classifier), "--num_samples", "4", "--batch_size", "4",
              "--cache_dir", str(tmp_path / "cache")]
    assert main(["eval", "--model", folder, *common, "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert (result["sampler"], result["steps"], result["timestep_spacing"]) == ("lcm", 2, "grid of 10")
    assert main(["sweep", "--model", folder, *common, "--out_dir", str(tmp_path / "sweep")]) == 0
    rows = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()[1:]
    assert [(r.split(",")[0], int(r.split(",")[2])) for r in rows] == [("lcm", 1), ("lcm", 2), ("lcm", 4), ("lcm", 8)]
    capsys.readouterr()
    # A student is sampled by lcm alone, and lcm samples students alone; a student does not edit.
    assert main(["sample", "--model", folder, "--scheduler", "ddim", "--out", str(tmp_path / "x.png")]) == 2
    assert "choose one of: lcm" in capsys.readouterr().err
    assert main(["sample", "--model", str(teacher_run / "pipeline"), "--scheduler", "lcm",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "'lcm' samples a consistency-distilled (ldm distill) model" in capsys.readouterr().err
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("L", (16, 16), 128).save(image)
    assert main(["edit", "--model", folder, "--image", str(image), "--out", str(tmp_path / "o.png")]) == 2
    assert "edit with its teacher" in capsys.readouterr().err

    pytest.importorskip("gradio", reason="the demo extra is not installed")
    from ldm.demo.serving import Runner, read_capabilities

    caps = read_capabilities(folder)
    assert (caps.steps, caps.tasks) == (2, ("generate",))  # the Steps slider starts at the student's own
    assert read_capabilities(teacher_run / "pipeline").steps == 50
    runner = Runner({"generate": local_student(folder)})
    assert runner.sampler_choices("generate") == [("saved (LCM, grid of 10)", "saved"), ("lcm", "lcm")]


def local_student(folder):
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
def test_text_student_is_a_stock_stable_diffusion_folder(vae_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from ldm.train.unet import train_unet

    text = {"denoiser.conditioning": "text", "data.caption_template": "a handwritten digit {name}"}
    run(train_unet, tiny_config(tmp_path, **DATA, **text, **{
        "denoiser.vae_path": str(vae_dir), "denoiser.train.max_steps": 2, "denoiser.train.sample_every": 0,
        "denoiser.train.report_to": "none", "denoiser.train.checkpointing_steps": 0}))
    assert distill("--model", str(tmp_path / "pipeline"), "--output_dir", str(tmp_path), f"--denoiser.vae_path={vae_dir}",
                   "--data.max_samples=24", "--denoiser.conditioning=text",
                   "--data.caption_template=a handwritten digit {name}", "--train.max_steps=2",
                   "--train.checkpointing_steps=0", "--train.sample_every=0", "--train.report_to=none") == 0
    folder = tmp_path / "student"
    index = json.loads((folder / "model_index.json").read_text())
    assert (index["_class_name"], index["_num_inference_steps"], index["_guidance_scale"]) == (
        "StableDiffusionPipeline", 2, 1.0)
    pipe = StableDiffusionPipeline.from_pretrained(folder)  # no remote code
    assert isinstance(pipe.scheduler, LCMScheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a handwritten digit 3"], guidance_scale=1.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 1)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="distilled for at most 10 steps"):  # StableDiffusionPipeline's LCM would refuse
        assert main(["sample", "--model", str(folder), "--prompt", "a handwritten digit 3", "--num_images", "1",
                     "--steps", "12", "--out", str(tmp_path / "t.png")]) == 0
    assert "12 steps" in capsys.readouterr().out


def test_class_student_samples_without_guidance(tmp_path):
    """A class student's folder keeps the teacher's classes, guidance 1 (its guidance is in its weights)."""
    from ldm.distill.student import make_student_pipeline
    from ldm.distill.task import student_scheduler

    teacher = Teacher(tiny_class_teacher(), guidance_scale=3.0)
    assert teacher.guidance_scale == 3.0  # distill.guidance_scale over the teacher's own
    cfg = tiny_config(tmp_path)
    pipe = make_student_pipeline(teacher, teacher.denoiser, student_scheduler(teacher.pipe.scheduler.config, cfg), 2)
    pipe.save_pretrained(tmp_path / "student")
    loaded = load_pipeline(tmp_path / "student")
    assert (loaded.class_names, loaded.default_guidance_scale, loaded.default_num_inference_steps) == (
        ["a", "b", "c"], 1.0, 2)
    loaded.set_progress_bar_config(disable=True)
    assert len(loaded(class_labels=["c", 0], output_type="np").images) == 2


# ----- bad input: a clear message, before any work -----

@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("empty", "is not a trained model: it has no model_index.json"),
    ("other pipeline", "holds a FluxPipeline, not a model that ldm trains"),
    ("incomplete", "is incomplete: it has no vae/config.json"),
    ("student", "is already a consistency-distilled student"),
    ("flow", "is a flow-matching model (diffusion.objective: flow)"),
    ("superres", "is a super-resolution model"),
])
def test_folders_that_are_not_a_trained_model_are_refused(case, message, teacher_run, straight, tmp_path, capsys):
    folder = tmp_path / "model"
    if case == "empty":
        folder.mkdir()
    elif case == "other pipeline":
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    elif case == "student":
        folder = straight / "student"
    elif case != "missing":
        shutil.copytree(teacher_run / "pipeline", folder)
        if case == "incomplete":
            shutil.rmtree(folder / "vae")
        edits = {"flow": ("scheduler/scheduler_config.json", {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                              "shift": 1.0}),
                 "superres": ("unet/config.json", {"in_channels": 5})}
        if case in edits:
            name, values = edits[case]
            config = json.loads((folder / name).read_text())
            if case == "flow":
                config = {k: v for k, v in config.items() if not k.startswith("beta")}
            (folder / name).write_text(json.dumps({**config, **values}))
    out = tmp_path / "out"
    assert distill("--model", str(folder), "--output_dir", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm distill: error: ") and message in err, err
    assert not out.exists()  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["--skip_interval=30"], "distill.skip_interval=30 does not divide the teacher's 1000 training timesteps"),
    (["--data.resolution=32"], "the teacher's autoencoder makes 16px 1-channel images, but the config's data is 32px"),
    (["--data.color_mode=rgb"], "the config's data is 16px with 3 channels"),
    (["OTHER_VAE"], "the teacher's autoencoder is not the config run's"),
    (["--data.caption_template=digit {name}"], "the teacher was trained on other data than the config's"),
    (["--guidance_scale=2"], "the teacher is unconditional, it has no guidance"),
])
def test_a_teacher_that_does_not_fit_the_config_is_refused(overrides, message, teacher_run, vae_dir, tmp_path,
                                                            capsys):
    vae = f"--denoiser.vae_path={vae_dir}"
    if overrides == ["OTHER_VAE"]:
        other = AutoencoderKL.from_pretrained(vae_dir)
        with torch.no_grad():
            other.decoder.conv_out.bias.add_(0.01)
        other.save_pretrained(tmp_path / "other_vae")
        vae, overrides = f"--denoiser.vae_path={tmp_path / 'other_vae'}", []
    out = tmp_path / "out"
    assert distill("--model", str(teacher_run / "pipeline"), "--output_dir", str(out), vae, "--data.max_samples=24",
                   *overrides) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_a_class_teacher_on_other_classes_is_refused(tmp_path):
    from ldm.data import DataInfo
    from ldm.distill.teacher import TeacherError, check_teacher

    info = DataInfo(num_channels=1, resolution=16, num_classes=2, class_names=["x", "y"], num_train=4, num_holdout=0,
                    fingerprint="f")
    with pytest.raises(TeacherError, match=r"the teacher's classes \(3: \['a', 'b', 'c'\]\) are not the data's"):
        check_teacher(tiny_class_teacher(), tiny_config(tmp_path), info, tmp_path)
    unlabelled = DataInfo(1, 16, None, None, 4, 0, "f")
    with pytest.raises(TeacherError, match="the teacher is class-conditional .3 classes., but the config's data has no"):
        check_teacher(tiny_class_teacher(), tiny_config(tmp_path), unlabelled, tmp_path)


@pytest.mark.parametrize("override, message", [
    ({"distill.skip_interval": 0}, r"distill\.skip_interval: must be positive"),
    ({"distill.num_inference_steps": 0}, r"distill\.num_inference_steps: must be positive"),
    ({"distill.target_decay": 1.0}, r"distill\.target_decay: must be in \[0, 1\)"),
    ({"distill.guidance_scale": -1.0}, r"distill\.guidance_scale: must be >= 0"),
    ({"distill.huber_c": 0.0}, r"distill\.huber_c: must be a finite number > 0"),
    ({"distill.train.batch_size": 0}, r"distill\.train\.batch_size: must be positive"),
    ({"distill.train.ema_posthoc": True}, r"distill\.train\.ema_posthoc: post-hoc EMA is built for the denoiser"),
    ({"denoiser.sample_scheduler": "lcm"}, r"samples the consistency-distilled students of `ldm distill`"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs/tiny.yaml", override)


def test_distill_without_a_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--config", TINY])
    assert "--model" in capsys.readouterr().err
