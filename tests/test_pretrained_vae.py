"""A published autoencoder as stage 1 (vae.pretrained, issue 18): published on the local Hub stand-in as a full
Stable Diffusion repository (subfolder vae, RGB, 4 channels, used on grayscale digits) and as a 16-channel one with a
shift; train_vae.py -> train_unet.py -> sampling by both loading routes; the measured latent statistics; decoder
fine-tuning that leaves the latents bitwise unchanged; and each bad input named before any weights are downloaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from helpers import run, tiny_config
from hub_stand_in import HubStandIn
from test_hub import hub_env

from ldm import pretrained_vae
from ldm.config import ConfigError
from ldm.pipelines import latents

REPO = Path(__file__).resolve().parents[1]


def published_vae(channels: int = 3, latent_channels: int = 4, shift: float | None = None, levels: int = 2,
                  seed: int = 0) -> AutoencoderKL:
    """A tiny AutoencoderKL as publishers save them: sample_size 256 whatever the images, their own statistics."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=(32,) * levels,
                         down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=32, sample_size=256,
                         scaling_factor=0.18215 if shift is None else 1.5, shift_factor=shift)


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def publish(hub, repo_id: str, files: dict[str, bytes]) -> None:
    hub.state.repos[repo_id] = dict(files)
    hub.state.commits[repo_id] = f"{abs(hash(repo_id)):040d}"[:40]


def sd_repository(tmp_path: Path) -> dict[str, bytes]:
    """A full SD-style repository: model_index.json at the root, the autoencoder under vae/."""
    published_vae().save_pretrained(tmp_path / "sd" / "vae")
    index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
             "unet": ["diffusers", "UNet2DConditionModel"]}
    return {"model_index.json": json.dumps(index).encode(), **folder_files(tmp_path / "sd" / "vae", "vae/")}


def flux_repository(tmp_path: Path) -> dict[str, bytes]:
    published_vae(channels=1, latent_channels=16, shift=0.3, seed=1).save_pretrained(tmp_path / "flux")
    return folder_files(tmp_path / "flux")


END_TO_END = """
import json, sys
import numpy as np, torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, DiffusionPipeline
from ldm.config import load_config
from ldm.data import build_dataloader, build_datasets
from ldm.pipelines import LatentDiffusionPipeline, latents
from ldm.train.unet import train_unet
from ldm.train.vae import train_vae

out, overrides = sys.argv[1], json.loads(sys.argv[2])
cfg = load_config("configs/tiny.yaml", {"output_dir": out, **overrides})
for train in (train_vae, train_unet):
    AcceleratorState._reset_state(reset_partial_state=True)
    train(cfg)
# What the UNet is trained on: posterior samples of the training images, scaled (and shifted) by vae/model.
vae = AutoencoderKL.from_pretrained(out + "/vae/model", use_safetensors=True)
train_set, _, _ = build_datasets(cfg.data)
loader = build_dataloader(train_set, 64, shuffle=False, num_workers=0, seed=0, drop_last=False)
with torch.no_grad():
    z = torch.cat([latents.encode(vae, b["pixel_values"], torch.Generator().manual_seed(0)) for b in loader])
ours = LatentDiffusionPipeline.from_pretrained(out + "/pipeline")
remote = DiffusionPipeline.from_pretrained(out + "/pipeline", trust_remote_code=True)
images = [p(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
          for p in (ours, remote)]
json.dump({"mean": z.mean().item(), "std": z.std().item(), "type": type(ours).__name__,
           "max_difference": float(np.abs(images[0] - images[1]).max()), "shape": list(images[0].shape)},
          open(out + "/result.json", "w"))
"""


@pytest.mark.slow
def test_train_on_published_autoencoders_from_the_hub_then_sample_both_ways(tmp_path):
    runs = {"sd": {"vae.pretrained": "org/sd-tiny", "vae.pretrained_subfolder": "vae"},
            "flux": {"vae.pretrained": "org/flux-tiny"}}
    with HubStandIn() as hub:
        publish(hub, "org/sd-tiny", sd_repository(tmp_path))
        publish(hub, "org/flux-tiny", flux_repository(tmp_path))
        env = hub_env(hub.url, tmp_path / "hf_home")
        for name, overrides in runs.items():
            result = subprocess.run([sys.executable, "-c", END_TO_END, str(tmp_path / name), json.dumps(overrides)],
                                    capture_output=True, text=True, env=env, cwd=REPO, timeout=900, check=False)
            assert result.returncode == 0, result.stderr[-4000:]
            assert "held-out PSNR" in result.stdout
    sd_vae = json.loads((tmp_path / "sd" / "vae" / "model" / "config.json").read_text())
    flux_vae = json.loads((tmp_path / "flux" / "vae" / "model" / "config.json").read_text())
    # The RGB autoencoder now takes the grayscale digits; its sample_size is the data's, not the publisher's 256.
    assert (sd_vae["in_channels"], sd_vae["out_channels"], sd_vae["sample_size"]) == (1, 1, 16)
    assert sd_vae["scaling_factor"] != 0.18215 and flux_vae["shift_factor"] not in (None, 0.3)
    assert flux_vae["latent_channels"] == 16
    for name in runs:
        result = json.loads((tmp_path / name / "result.json").read_text())
        # Mean ~0 (a 4-channel mean below SHIFT_MIN_STDS std is left unshifted) and std ~1 for both autoencoders.
        assert abs(result["mean"]) < 0.12 and abs(result["std"] - 1) < 0.1, (name, result)
        assert result["type"] == "LatentDiffusionPipeline" and result["shape"] == [2, 16, 16, 1]
        assert result["max_difference"] < 1e-5, (name, result)
        metrics = json.loads((tmp_path / name / "vae" / "metrics.json").read_text())
        card = (tmp_path / name / "pipeline" / "README.md").read_text()
        assert f"pretrained `{metrics['pretrained']}`" in card and "publisher's" in card
    assert json.loads((tmp_path / "flux" / "vae" / "metrics.json").read_text())["publisher_shift_factor"] == 0.3


class FixedLatents:
    """A stand-in encoder whose posterior is N(z, e^-30): `measure_latent_statistics` sees exactly z."""

    device, dtype, training = torch.device("cpu"), torch.float32, False

    def __init__(self, z: torch.Tensor):
        self.z, self.seen = z, 0

    def encode(self, images):
        z = self.z[self.seen:self.seen + len(images)]
        self.seen += len(images)
        params = torch.cat([z, torch.full_like(z, -30.0)], dim=1)
        return type("Output", (), {"latent_dist": DiagonalGaussianDistribution(params)})()

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def test_measured_statistics_recover_a_known_mean_and_std_and_normalise_the_latents():
    z = 0.7 + 2.5 * torch.randn(64, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    images = [torch.zeros(16, 1, 8, 8) for _ in range(4)]
    mean, std = latents.measure_latent_statistics(FixedLatents(z), images, num_samples=64)
    assert mean == pytest.approx(z.double().mean().item(), abs=1e-4) and mean == pytest.approx(0.7, abs=0.05)
    assert std == pytest.approx(z.double().std().item(), rel=1e-3) and std == pytest.approx(2.5, rel=0.03)
    stats = pretrained_vae.chosen_statistics("measure", {"scaling_factor": 0.18215, "shift_factor": None}, mean, std)
    assert stats == {"scaling_factor": pytest.approx(1 / std), "shift_factor": pytest.approx(mean)}
    vae = published_vae(channels=1)
    vae.register_to_config(**stats)
    scaled = latents.scale(vae, z)
    assert scaled.mean().item() == pytest.approx(0, abs=1e-4) and scaled.std().item() == pytest.approx(1, abs=1e-3)
    # decode inverts it: D gets z back.
    assert torch.allclose(scaled / vae.config.scaling_factor + vae.config.shift_factor, z, atol=1e-5)
    # A mean well under SHIFT_MIN_STDS std is not stored, a publisher's shift is always replaced, config keeps theirs.
    none = {"scaling_factor": 0.18215, "shift_factor": None}
    assert pretrained_vae.chosen_statistics("measure", none, 0.01, 1.0)["shift_factor"] is None
    assert pretrained_vae.chosen_statistics("measure", {**none, "shift_factor": 0.1}, 0.01, 1.0)["shift_factor"] == 0.01
    assert pretrained_vae.chosen_statistics("config", none, 0.5, 2.0) == none


def test_grayscale_conversion_is_three_equal_channels_in_and_the_channel_mean_out():
    rgb = published_vae()
    gray = pretrained_vae.to_grayscale(rgb)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(gray.encode(x).latent_dist.mean, rgb.encode(x.repeat(1, 3, 1, 1)).latent_dist.mean,
                                   atol=1e-5, rtol=1e-4)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(gray.decode(z).sample, rgb.decode(z).sample.mean(1, keepdim=True), atol=1e-5,
                                   rtol=1e-4)


def test_decoder_finetuning_leaves_the_latents_bitwise_unchanged(tmp_path):
    from ldm.train.vae import train_vae

    published_vae().save_pretrained(tmp_path / "published")
    cfg = tiny_config(tmp_path / "run", **{"vae.pretrained": str(tmp_path / "published"), "vae.finetune": "decoder",
                                           "vae.train.max_steps": 3, "vae.train.sample_every": 0,
                                           "vae.train.checkpointing_steps": 0, "vae.train.use_ema": True})
    metrics = run(train_vae, cfg)
    before = pretrained_vae.to_grayscale(AutoencoderKL.from_pretrained(tmp_path / "published"))
    after = AutoencoderKL.from_pretrained(tmp_path / "run" / "vae" / "model")
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        for a, b in zip(latents.posterior_moments(before, x), latents.posterior_moments(after, x)):
            assert torch.equal(a, b)
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert metrics["finetune"] == "decoder" and "holdout_psnr" in metrics


BAD_INPUTS = """
import json, sys
from ldm.config import ConfigError, load_config
from ldm.train import pretrained
answers = {}
for name, overrides in json.loads(sys.argv[1]).items():
    try:
        pretrained.check(load_config("configs/tiny.yaml", {"output_dir": "unused", **overrides}))
        answers[name] = "accepted"
    except ConfigError as e:
        answers[name] = str(e)
print(json.dumps(answers))
"""


def test_bad_pretrained_autoencoders_are_named_before_any_weights_download(tmp_path):
    cases = {
        "missing": {"vae.pretrained": "org/no-such-vae"},
        "gated": {"vae.pretrained": "org/gated-vae"},
        "full pipeline": {"vae.pretrained": "org/sd-tiny"},
        "pickled": {"vae.pretrained": "org/pickled-vae"},
        "resolution": {"vae.pretrained": "org/f16-vae", "data.resolution": 24},
        "rgb data on a gray autoencoder": {"vae.pretrained": "org/f16-vae", "data.color_mode": "rgb", "data.resolution": 32},
        "good": {"vae.pretrained": "org/sd-tiny", "vae.pretrained_subfolder": "vae"},
    }
    with HubStandIn() as hub:
        sd = sd_repository(tmp_path)
        publish(hub, "org/sd-tiny", sd)
        publish(hub, "org/gated-vae", sd)
        hub.state.gated.add("org/gated-vae")
        config = sd["vae/config.json"]
        publish(hub, "org/pickled-vae", {"config.json": config, "diffusion_pytorch_model.bin": b"not unpickled"})
        f16 = json.loads(config)
        f16.update(in_channels=1, out_channels=1, block_out_channels=[32] * 5)
        publish(hub, "org/f16-vae", {"config.json": json.dumps(f16).encode(),
                                     "diffusion_pytorch_model.safetensors": b"never downloaded"})
        env = hub_env(hub.url, tmp_path / "hf_home")
        result = subprocess.run([sys.executable, "-c", BAD_INPUTS, json.dumps(cases)], capture_output=True, text=True,
                                env=env, cwd=REPO, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers["missing"].startswith("vae.pretrained='org/no-such-vae': the Hub answered:")
    assert "gated" in answers["gated"] and "HF_TOKEN" in answers["gated"] and "restricted" in answers["gated"]
    assert "it is a full pipeline: set vae.pretrained_subfolder: vae" in answers["full pipeline"]
    assert "only pickled weights (diffusion_pytorch_model.bin)" in answers["pickled"]
    assert answers["resolution"].startswith("data.resolution=24 is not divisible by the downsampling factor f=16")
    assert "set data.color_mode: grayscale" in answers["rgb data on a gray autoencoder"]
    assert answers["good"] == "accepted"
    assert all("\n" not in answer for answer in answers.values())
    assert not list((tmp_path / "hf_home").rglob("*.safetensors"))  # the checks read no weights


@pytest.mark.parametrize("overrides, key", [
    ({"vae.finetune": "decoder"}, "vae.finetune='decoder' needs vae.pretrained"),
    ({"vae.pretrained_subfolder": "vae"}, "vae.pretrained_subfolder='vae' needs vae.pretrained"),
    ({"vae.latent_stats": "config"}, "vae.latent_stats=config keeps a publisher's scaling_factor"),
])
def test_pretrained_keys_without_a_pretrained_autoencoder_are_refused(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        tiny_config(tmp_path, **overrides)


def test_a_local_folder_that_does_not_exist_is_named(tmp_path):
    from ldm.train import pretrained

    with pytest.raises(ConfigError, match="vae.pretrained='./nowhere': no such folder"):
        pretrained.check(tiny_config(tmp_path, **{"vae.pretrained": "./nowhere"}))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
