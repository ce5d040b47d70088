"""Flow-matching training (denoiser.diffusion.objective: flow): its config keys and refusals, configs/tiny.yaml with
`--diffusion.objective=flow` through `accelerate launch` with an exact resume and `ldm sample` on the result, and
class, text and super-resolution flow models trained in-process, then sampled, edited, upscaled and evaluated by the
commands."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, run, saved_tiny_vae, tiny_config
from PIL import Image

from ldm.cli import main
from ldm.config import ConfigError, load_config, parse_overrides, save_config
from ldm.config.objective import FLOW_SAMPLERS
from ldm.config.schema import DenoiserStageConfig
from ldm.objectives import DDPMObjective, FlowObjective, make_objective
from ldm.objectives import flow as flow_math
from ldm.pipelines.loading import load_pipeline
from ldm.schedulers import FLOW_SCHEDULERS, SCHEDULERS
from ldm.train.unet import train_unet

FLOW = {"denoiser.diffusion.objective": "flow"}


# ----- config -----


def test_null_keys_take_their_objectives_defaults_and_are_saved(tmp_path):
    flow = tiny_config(tmp_path, **FLOW)
    d = flow.denoiser.diffusion
    assert (d.flow_shift, d.weighting_scheme, d.logit_mean, d.logit_std) == (1.0, "logit_normal", 0.0, 1.0)
    assert (d.prediction_type, d.snr_gamma) == (None, None)
    assert (flow.denoiser.sample_scheduler, flow.denoiser.sample_timestep_spacing) == ("flow-euler", None)
    ddpm = tiny_config(tmp_path).denoiser
    assert (ddpm.diffusion.prediction_type, ddpm.sample_scheduler, ddpm.sample_timestep_spacing) == (
        "epsilon", "dpm++sde", "trailing")  # the values these keys had before they could be null
    assert (ddpm.diffusion.flow_shift, ddpm.diffusion.weighting_scheme) == (None, None)
    save_config(flow, tmp_path / "config.yaml")  # the resolved config of a run reads back as itself
    assert load_config(tmp_path / "config.yaml") == flow


def test_config_names_agree_with_the_schedulers():
    assert set(FLOW_SAMPLERS) == set(FLOW_SCHEDULERS)
    literal = DenoiserStageConfig.__annotations__["sample_scheduler"]
    assert all(f"'{name}'" in literal for name in SCHEDULERS)


@pytest.mark.parametrize("overrides, message", [
    ({**FLOW, "denoiser.diffusion.prediction_type": "epsilon"},
     r"denoiser\.diffusion\.prediction_type='epsilon' \(a flow model predicts the velocity"),
    ({**FLOW, "denoiser.diffusion.prediction_type": "v_prediction"}, r"--diffusion\.prediction_type=null"),
    ({**FLOW, "denoiser.diffusion.snr_gamma": 5.0}, r"denoiser\.diffusion\.snr_gamma=5\.0 \(min-SNR"),
    ({**FLOW, "denoiser.diffusion.beta_schedule": "linear"}, r"beta_schedule='linear' \(a flow model has no betas"),
    ({**FLOW, "denoiser.sample_scheduler": "ddim"}, r"denoiser\.sample_scheduler='ddim' \(it samples DDPM models"),
    ({**FLOW, "denoiser.sample_timestep_spacing": "trailing"}, r"denoiser\.sample_timestep_spacing='trailing'"),
    ({**FLOW, "denoiser.diffusion.flow_shift": 0.0}, r"denoiser\.diffusion\.flow_shift: must be a finite number, pos"),
    ({**FLOW, "denoiser.diffusion.logit_std": -1.0}, r"denoiser\.diffusion\.logit_std: must be a finite number, pos"),
    ({**FLOW, "denoiser.diffusion.logit_mean": float("nan")}, r"denoiser\.diffusion\.logit_mean: must be a finite"),
    ({**FLOW, "denoiser.diffusion.weighting_scheme": "uniform", "denoiser.diffusion.logit_mean": 0.5},
     r"denoiser\.diffusion\.logit_mean shapes the logit-normal density"),
    ({"denoiser.diffusion.flow_shift": 3.0},
     r"denoiser\.diffusion\.flow_shift=3\.0 is a flow-matching key, and denoiser\.diffusion\.objective is ddpm"),
    ({"denoiser.diffusion.weighting_scheme": "uniform"}, r"denoiser\.diffusion\.weighting_scheme='uniform' is a flow"),
    ({"denoiser.sample_scheduler": "flow-heun"}, r"denoiser\.sample_scheduler='flow-heun' samples flow-matching"),
])
def test_keys_of_the_other_objective_are_refused_by_name(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **overrides)


def test_a_ddpm_config_switched_to_flow_names_every_ddpm_key_and_the_overrides_that_fix_them(tmp_path):
    """A config that spells out epsilon, dpm++sde and trailing (configs/digits.yaml before it moved to flow): one
    error names all three, and the overrides it gives make the config load as a flow config."""
    tree = yaml.safe_load((REPO / "configs/digits.yaml").read_text())
    tree["denoiser"]["diffusion"] = {"prediction_type": "epsilon"}
    tree["denoiser"].update(sample_scheduler="dpm++sde", sample_timestep_spacing="trailing")
    ddpm = tmp_path / "ddpm.yaml"
    ddpm.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as error:
        load_config(ddpm, FLOW)
    text = str(error.value)
    for key in ("prediction_type='epsilon'", "sample_scheduler='dpm++sde'", "sample_timestep_spacing='trailing'"):
        assert key in text
    fixes = text.split("override them: ")[1].split()
    cfg = load_config(ddpm, {**FLOW, **parse_overrides(fixes, stage="unet")})
    assert cfg.denoiser.sample_scheduler == "flow-euler" and cfg.denoiser.diffusion.prediction_type is None


def test_objectives_mix_and_target_as_their_equations(tmp_path):
    """The training task's only objective-specific calls: the flow objective's input is the interpolation at σ = t/T,
    its target the velocity, its σ drawn through the saved scheduler's shift from the global RNG (which checkpoints
    keep); the DDPM objective is DDPMScheduler.add_noise at integer timesteps."""
    cfg = tiny_config(tmp_path, **FLOW, **{"denoiser.diffusion.flow_shift": 3.0}).denoiser.diffusion
    objective = make_objective(cfg)
    assert isinstance(objective, FlowObjective) and objective.scheduler.config.shift == 3.0
    x, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    torch.manual_seed(5)
    t = objective.sample_t(4, "cpu")
    torch.manual_seed(5)
    assert torch.equal(objective.sample_t(4, "cpu"), t)  # the global RNG: a resumed run draws the same σ
    u = torch.sigmoid(torch.randn(4, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(t / 1000, flow_math.shifted(u, 3.0))
    torch.testing.assert_close(objective.noisy(x, noise, t), flow_math.interpolate(x, noise, t / 1000))
    assert torch.equal(objective.target(x, noise, t), noise - x)
    loss, logs = objective.loss(noise - x, noise - x, t)
    assert loss.item() == 0.0 and "mse" in logs

    ddpm = make_objective(tiny_config(tmp_path).denoiser.diffusion)
    assert isinstance(ddpm, DDPMObjective) and ddpm.scheduler.config.prediction_type == "epsilon"
    t = ddpm.sample_t(4, "cpu")
    assert t.dtype == torch.long and torch.equal(ddpm.noisy(x, noise, t), ddpm.scheduler.add_noise(x, noise, t))
    assert torch.equal(ddpm.target(x, noise, t), noise)


# ----- training -----


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """An autoencoder of configs/tiny.yaml's shape (16 px grayscale, 8x8x4 latents)."""
    return saved_tiny_vae(tmp_path_factory.mktemp("vae") / "model")


# tiny.yaml --diffusion.objective=flow through accelerate launch, with an exact resume, `ldm sample` with both flow
# samplers and the refusals of DDPM samplers and spacings: tests/test_dit_end_to_end.py, on the transformer backbone
# (--model.type=dit as well, as the check runs it).


QUIET = {"denoiser.train.checkpointing_steps": 0, "denoiser.train.sample_every": 0, "denoiser.train.report_to": "none",
         "denoiser.model.norm_num_groups": 8}


@pytest.fixture(scope="module")
def flow_models(vae_dir, tmp_path_factory) -> dict[str, Path]:
    """Class (under a 6-second time budget), text and super-resolution flow models, trained in-process."""
    root = tmp_path_factory.mktemp("flow")
    runs = {
        "class": {"denoiser.conditioning": "class", "denoiser.train.max_minutes": 0.1,
                  "denoiser.train.budget_probe_steps": 2},
        "text": {"denoiser.conditioning": "text", "data.caption_template": "a handwritten digit {name}",
                 "denoiser.train.max_steps": 2},
        "superres": {"denoiser.task": "superres", "data.degrade.factor": 2, "denoiser.train.max_steps": 2},
    }
    for name, overrides in runs.items():
        cfg = tiny_config(root / name, **FLOW, **QUIET, **{"denoiser.vae_path": str(vae_dir), **overrides})
        metrics = run(train_unet, cfg)
        assert Path(metrics["pipeline"]).is_dir()
    return {name: root / name / "pipeline" for name in runs}


def test_class_and_text_flow_models_sample_with_guidance(flow_models, tmp_path):
    class_model = load_pipeline(flow_models["class"])
    assert type(class_model.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    saved = yaml.safe_load((flow_models["class"].parent / "unet" / "config.yaml").read_text())["denoiser"]["train"]
    assert saved["max_minutes"] == 0.1  # trained under the time budget, which knows nothing of the objective
    assert main(["sample", "--model", str(flow_models["class"]), "--class_labels", "3,7", "--guidance_scale", "3",
                 "--num_images", "2", "--steps", "3", "--out", str(tmp_path / "class.png")]) == 0
    text = load_pipeline(flow_models["text"])
    assert type(text).__name__ == "LatentTextToImagePipeline"  # StableDiffusionPipeline cannot start flow sampling
    assert main(["sample", "--model", str(flow_models["text"]), "--prompt", "a handwritten digit 3",
                 "--guidance_scale", "2", "--num_images", "2", "--steps", "3", "--scheduler", "flow-heun",
                 "--out", str(tmp_path / "text.png")]) == 0
    assert Image.open(tmp_path / "text.png").size == (2 * 16, 16)


def test_flow_models_edit_and_upscale_with_the_commands(flow_models, tmp_path, capsys):
    Image.new("L", (16, 16), 0).save(tmp_path / "image.png")
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    mask.save(tmp_path / "mask.png")
    Image.new("L", (8, 8), 128).save(tmp_path / "small.png")
    model = str(flow_models["class"])
    common = ["--image", str(tmp_path / "image.png"), "--class_labels", "3", "--steps", "4"]
    assert main(["edit", "--model", model, *common, "--strength", "0.5", "--out", str(tmp_path / "a.png")]) == 0
    assert main(["edit", "--model", model, *common, "--mask", str(tmp_path / "mask.png"), "--jump_length", "1",
                 "--jump_n_sample", "2", "--out", str(tmp_path / "b.png")]) == 0  # flow-euler by default: rewinds
    assert (np.asarray(Image.open(tmp_path / "b.png"))[:4] == 0).all()  # paste-back: unmasked pixels are the input's
    capsys.readouterr()
    assert main(["edit", "--model", model, *common, "--mask", str(tmp_path / "mask.png"), "--scheduler", "flow-heun",
                 "--out", str(tmp_path / "c.png")]) == 2
    assert "is of order 2; use a first-order scheduler" in capsys.readouterr().err
    assert main(["upscale", "--model", str(flow_models["superres"]), "--image", str(tmp_path / "small.png"),
                 "--steps", "3", "--out", str(tmp_path / "big.png")]) == 0
    assert Image.open(tmp_path / "big.png").size == (16, 16)


def test_ldm_eval_and_sweep_sample_flow_models_with_flow_samplers(flow_models, tmp_path):
    data = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    data_config = tmp_path / "data.yaml"
    data_config.write_text(yaml.safe_dump(data))
    classifier = tmp_path / "classifier"
    assert main(["train-classifier", "--data", str(data_config), "--out", str(classifier), "--epochs", "1"]) == 0
    common = ["--model", str(flow_models["class"]), "--data", str(data_config), "--features", str(classifier),
              "--num_samples", "10", "--batch_size", "10", "--cache_dir", str(tmp_path / "cache")]
    assert main(["eval", *common, "--steps", "2", "--metrics", "fid", "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert (result["sampler"], result["timestep_spacing"]) == ("flow-euler", "shift 1")
    assert main(["sweep", *common, "--steps", "1", "--out_dir", str(tmp_path / "sweep")]) == 0
    rows = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == list(FLOW_SCHEDULERS)
    assert main(["sweep", *common, "--steps", "1", "--schedulers", "ddim", "--out_dir", str(tmp_path / "x")]) == 2
