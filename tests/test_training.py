"""The two training stages in-process on tiny models: outputs, scaling factor, checkpoints, exact resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import REPO, assert_same_checkpoint, run, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.config import ConfigError, load_config
from ldm.data import build_dataloader, build_datasets
from ldm.pipelines import latents
from ldm.train.unet import UNetTask, train_unet
from ldm.train.vae import VAETask, train_vae


@pytest.fixture(scope="module")
def trained_vae_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run(train_vae, tiny_config(out, **{"vae.train.max_steps": 20}))
    return out


def test_vae_stage_outputs(trained_vae_dir):
    vae_dir = trained_vae_dir / "vae"
    assert (vae_dir / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert (vae_dir / "config.yaml").is_file()
    saved = load_config(vae_dir / "config.yaml")
    assert saved.vae.train.max_steps == 20
    # checkpoints every 3 steps, only the newest 3 kept, no temporary leftovers
    names = sorted(p.name for p in (vae_dir / "checkpoints").iterdir())
    assert names == ["checkpoint-12", "checkpoint-15", "checkpoint-18"]
    assert list((vae_dir / "samples").glob("step-*.png"))
    assert list((vae_dir / "logs").rglob("events.out.tfevents.*"))


def test_stored_scaling_factor_gives_unit_std_latents(trained_vae_dir):
    vae = AutoencoderKL.from_pretrained(trained_vae_dir / "vae" / "model")
    assert vae.config.scaling_factor != 1.0
    cfg = load_config(trained_vae_dir / "vae" / "config.yaml")
    train, _, _ = build_datasets(cfg.data)
    loader = build_dataloader(train, 64, shuffle=False, num_workers=0, seed=0, drop_last=False)
    with torch.no_grad():
        z = torch.cat([latents.encode(vae, batch["pixel_values"]) for batch in loader])
    assert z.std().item() == pytest.approx(1.0, abs=0.05)


def test_unet_requires_a_trained_vae(tmp_path):
    with pytest.raises(FileNotFoundError, match="run train_vae.py"):
        run(train_unet, tiny_config(tmp_path))


def test_unet_size_mismatch_is_a_clear_error(trained_vae_dir):
    cfg = tiny_config(trained_vae_dir, **{"denoiser.model.sample_size": 4})
    with pytest.raises(ConfigError, match=r"sample_size=4 does not match the VAE's latent size 8 \(16 px"):
        run(train_unet, cfg)


def unet_run(base: Path, vae_run: Path, name: str, **overrides) -> Path:
    out = base / name
    return out, tiny_config(out, **{"denoiser.vae_path": str(vae_run / "vae" / "model"), **overrides})


# 24 training images in batches of 8, 2 micro-batches per optimizer step: an epoch is 3 micro-batches and 2 steps
# (the second of only one micro-batch), so checkpoint-3 lies inside the second epoch, checkpoint-4 at its end, and
# the 6 steps cross two epoch boundaries.
EPOCHS_AND_ACCUMULATION = {"data.max_samples": 24, "train.gradient_accumulation_steps": 2}


def stage_overrides(stage: str, **overrides) -> dict:
    return {(f"{stage}.{k}" if k.startswith("train.") else k): v for k, v in overrides.items()}


def crash_after_step(step: int, straight: Path, resumed: Path, stage: str) -> dict[str, tuple[bytes, int]]:
    """The run dir a crash right after `step` leaves (its checkpoint, no later one, no final model); returns the
    files of that checkpoint."""
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / stage / "checkpoints" / "checkpoint-6")
    shutil.rmtree(resumed / ("pipeline" if stage == "unet" else "vae/model"))
    return files_of(resumed / stage / "checkpoints" / f"checkpoint-{step}")


def files_of(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def count_micro_batches(monkeypatch, task_cls) -> list[int]:
    """Record the optimizer step at which each micro-batch's loss is computed."""
    seen, compute_loss = [], task_cls.compute_loss

    def counting(self, batch, step):
        seen.append(step)
        return compute_loss(self, batch, step)

    monkeypatch.setattr(task_cls, "compute_loss", counting)
    return seen


def test_resumed_run_ends_with_identical_weights(trained_vae_dir, tmp_path, monkeypatch):
    """UNet from the latent cache with both flips stored: 6 steps straight == crash after step 4 (the end of an
    epoch) + resume for 2 more, with gradient accumulation. Weights, EMA and optimizer state bitwise equal."""
    options = {"data.random_flip": True, "denoiser.train.checkpointing_steps": 2,
               **stage_overrides("denoiser", **EPOCHS_AND_ACCUMULATION)}
    straight, cfg = unet_run(tmp_path, trained_vae_dir, "straight", **options)
    run(train_unet, cfg)
    checkpoint_4 = crash_after_step(4, straight, tmp_path / "resumed", "unet")

    _, cfg = unet_run(tmp_path, trained_vae_dir, "resumed", **options,
                      **{"denoiser.train.resume_from_checkpoint": "latest"})
    micro_batches = count_micro_batches(monkeypatch, UNetTask)
    metrics = run(train_unet, cfg)
    resumed = tmp_path / "resumed"

    # A resume, not a silent restart: it started at step 4 with the third epoch, computed only the micro-batches of
    # steps 5 (2) and 6 (1), and left checkpoint-4 as it was.
    assert metrics["start_step"] == 4
    assert micro_batches == [4, 4, 5]
    assert files_of(resumed / "unet" / "checkpoints" / "checkpoint-4") == checkpoint_4
    assert_same_checkpoint(straight / "unet" / "checkpoints" / "checkpoint-6",
                           resumed / "unet" / "checkpoints" / "checkpoint-6")
    a = load_file(straight / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ...and the run did change the weights (the comparison is not between two untouched inits).
    c4 = load_file(resumed / "unet" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(a_, c4[k]) for k, a_ in load_file(
        straight / "unet" / "checkpoints" / "checkpoint-6" / "model.safetensors").items())


def test_resume_from_missing_path_is_a_clear_error(trained_vae_dir, tmp_path):
    _, cfg = unet_run(tmp_path, trained_vae_dir, "x",
                      **{"denoiser.train.resume_from_checkpoint": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        run(train_unet, cfg)


@pytest.mark.parametrize("resume", ["latest", None])
def test_generation_checkpoints_are_not_continued_as_superresolution(trained_vae_dir, tmp_path, monkeypatch, resume):
    """The super-resolution UNet takes the low-res image as extra input channels: a generation run's checkpoints
    can neither be resumed nor mixed with by a super-resolution run, and the error names denoiser.task before any
    weights are read."""
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    quick = {"denoiser.train.max_steps": 2, "denoiser.train.checkpointing_steps": 2, "denoiser.train.sample_every": 0}
    run(train_unet, unet_run(tmp_path, trained_vae_dir, "run", **quick)[1])
    _, cfg = unet_run(tmp_path, trained_vae_dir, "run", **quick,
                      **{"denoiser.task": "superres", "denoiser.train.resume_from_checkpoint": resume})
    with pytest.raises(ConfigError, match=r"was written by a run with other settings: denoiser.task='generate' "
                                          r"\(now 'superres'\)"):
        run(train_unet, cfg)


def test_a_key_missing_from_an_older_run_config_compares_as_its_default(tmp_path):
    """A run written before denoiser.task existed was a generation run: it resumes as one, not as super-resolution."""
    import yaml

    from ldm.config import save_config
    from ldm.train.checkpoint import check_same_run

    save_config(tiny_config(tmp_path), tmp_path / "config.yaml")
    older = yaml.safe_load((tmp_path / "config.yaml").read_text())
    older["unet"] = older.pop("denoiser")  # ...and with the section's former name
    del older["unet"]["task"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    check_same_run(tiny_config(tmp_path), "unet", tmp_path / "config.yaml", "the run")
    with pytest.raises(ConfigError, match=r"denoiser.task='generate' \(now 'superres'\)"):
        check_same_run(tiny_config(tmp_path, **{"denoiser.task": "superres"}), "unet", tmp_path / "config.yaml",
                       "the run")


def test_a_run_saved_with_the_former_unet_section_resumes(trained_vae_dir, tmp_path):
    """A UNet run and checkpoint written before the section was renamed (`unet:` in their config.yaml, no
    model.type) resume from an old-style config file: the saved configs compare as the same run."""
    import yaml

    from ldm.train.checkpoint import write_checksums

    quick = {"denoiser.train.max_steps": 2, "denoiser.train.checkpointing_steps": 2, "denoiser.train.sample_every": 0}
    out, cfg = unet_run(tmp_path, trained_vae_dir, "run", **quick)
    run(train_unet, cfg)
    checkpoint = out / "unet" / "checkpoints" / "checkpoint-2"
    for saved in (out / "unet" / "config.yaml", checkpoint / "config.yaml"):
        tree = yaml.safe_load(saved.read_text())
        tree["unet"] = tree.pop("denoiser")
        del tree["unet"]["model"]["type"]
        saved.write_text(yaml.safe_dump(tree, sort_keys=False))
    write_checksums(checkpoint)  # as the older version wrote them, over its own config.yaml
    old_file = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    old_file["unet"] = old_file.pop("denoiser")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old_file))
    cfg = load_config(tmp_path / "old.yaml", {
        "output_dir": str(out), "unet.vae_path": str(trained_vae_dir / "vae" / "model"), "unet.train.max_steps": 3,
        "unet.train.sample_every": 0, "unet.train.resume_from_checkpoint": "latest"})
    assert run(train_unet, cfg)["start_step"] == 2


def test_resumed_vae_with_augmentation_and_discriminator_continues_exactly(tmp_path, monkeypatch):
    """The autoencoder stage with random crops and flips read by 2 persistent loader workers, gradient accumulation,
    epoch boundaries and its discriminator (started at step 2) resumes bitwise too."""
    options = {"vae.loss.disc_weight": 0.5, "vae.loss.disc_start": 2, "vae.loss.disc_layers": 1,
               "vae.train.use_ema": True, "data.crop": "random", "data.random_flip": True, "data.num_workers": 2,
               **stage_overrides("vae", **EPOCHS_AND_ACCUMULATION)}
    run(train_vae, tiny_config(tmp_path / "straight", **options))
    checkpoint_3 = crash_after_step(3, tmp_path / "straight", tmp_path / "resumed", "vae")
    micro_batches = count_micro_batches(monkeypatch, VAETask)
    metrics = run(train_vae, tiny_config(tmp_path / "resumed", **options,
                                         **{"vae.train.resume_from_checkpoint": "latest"}))
    assert metrics["start_step"] == 3 and micro_batches == [3, 4, 4, 5]
    assert files_of(tmp_path / "resumed" / "vae" / "checkpoints" / "checkpoint-3") == checkpoint_3
    straight = tmp_path / "straight" / "vae" / "checkpoints" / "checkpoint-6"
    assert (straight / "model_1.safetensors").is_file()  # the discriminator is part of the state
    assert_same_checkpoint(straight, tmp_path / "resumed" / "vae" / "checkpoints" / "checkpoint-6")


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_grids_and_evaluation_use_the_ema_weights(trained_vae_dir, tmp_path, monkeypatch):
    """With an EMA (decay 0.9, no warm-up) far from the raw weights: the sample grids, the evaluation during training,
    unet/best and the saved pipeline hold the EMA weights, and training goes on with the raw ones."""
    from ldm.eval import evaluation, features

    seen = {"grids": [], "evals": [], "train": []}

    class StubFeatures:  # evaluation itself is tested in test_eval_cli.py; here only which weights it sees
        metric_prefix = "stub-"

    def recording_evaluate(pipe, *args, **kwargs):
        seen["evals"].append(weights(pipe.unet))
        return {"metrics": {"stub-FID": 1.0 / len(seen["evals"])}}  # improves every time: unet/best follows

    sample_grid, compute_loss = UNetTask.sample_grid, UNetTask.compute_loss

    def recording_grid(self, model, step):
        seen["grids"].append((step, weights(model)))
        return sample_grid(self, model, step)

    def recording_loss(self, batch, step):
        seen["train"].append((step, weights(self.accelerator.unwrap_model(self.unet))))
        return compute_loss(self, batch, step)

    monkeypatch.setattr(features, "load_feature_network", lambda path: StubFeatures())
    monkeypatch.setattr(evaluation, "reference_features", lambda *args, **kwargs: {})
    monkeypatch.setattr(evaluation, "evaluate_pipeline", recording_evaluate)
    monkeypatch.setattr(UNetTask, "sample_grid", recording_grid)
    monkeypatch.setattr(UNetTask, "compute_loss", recording_loss)
    out, cfg = unet_run(tmp_path, trained_vae_dir, "ema", **{
        "denoiser.train.ema_decay": 0.9, "denoiser.train.ema_warmup": False, "denoiser.train.eval_every": 3})
    run(train_unet, cfg)

    ckpt = out / "unet" / "checkpoints"
    ema = {step: load_file(ckpt / f"checkpoint-{step}" / "ema.safetensors") for step in (3, 6)}
    raw = {step: load_file(ckpt / f"checkpoint-{step}" / "model.safetensors") for step in (3, 6)}
    raw = {step: {k: v for k, v in w.items() if k in ema[step]} for step, w in raw.items()}  # parameters only
    assert not same(ema[3], raw[3]) and not same(ema[6], raw[6])
    # grids at steps 3 and 6 and the final grid; evaluations at steps 3 and 6
    assert [step for step, _ in seen["grids"]] == [3, 6, 6]
    assert all(same(w, ema[step]) for step, w in seen["grids"])
    assert len(seen["evals"]) == 2 and same(seen["evals"][0], ema[3]) and same(seen["evals"][1], ema[6])
    # The first micro-batch after step 3's grid and evaluation trains the raw weights again.
    assert same(next(w for step, w in seen["train"] if step == 3), raw[3])
    for folder in ("pipeline", "unet/best"):
        saved = load_file(out / folder / "unet" / "diffusion_pytorch_model.safetensors")
        assert same({k: saved[k] for k in ema[6]}, ema[6]), folder


def test_stages_share_one_data_split_whatever_their_seeds(trained_vae_dir, tmp_path, monkeypatch):
    """data.seed, not vae.train.seed / denoiser.train.seed, splits the data: the UNet (from images or from the latent
    cache) trains on the VAE's training images, never on its held-out ones, and evaluation uses the same split."""
    from ldm.config import save_config
    from ldm.eval.evaluation import load_data
    from ldm.train import unet as unet_module
    from ldm.train import vae as vae_module

    seen = {}

    def capturing_fit(stage):
        def fit(task, run_cfg, train_cfg, dataset, collate_fn, **options):  # options: started_at of a time budget
            seen[stage] = (task, dataset)
            return {}
        return fit

    monkeypatch.setattr(vae_module, "fit", capturing_fit("vae"))
    monkeypatch.setattr(unet_module, "fit", capturing_fit("unet"))
    seeds = {"vae.train.seed": 1, "denoiser.train.seed": 2, "denoiser.vae_path": str(trained_vae_dir / "vae" / "model")}
    cfg = tiny_config(tmp_path, **seeds, **{"denoiser.latent_cache": False})
    run(train_vae, cfg)
    run(train_unet, cfg)

    def images(ds) -> list[bytes]:
        return [ds[i]["pixel_values"].numpy().tobytes() for i in range(len(ds))]

    vae_train, unet_train = images(seen["vae"][1]), images(seen["unet"][1])
    assert vae_train == unet_train
    assert not set(images(seen["vae"][0].holdout_dataset)) & set(unet_train)
    save_config(cfg, tmp_path / "run.yaml")
    train, holdout, _ = load_data(str(tmp_path / "run.yaml"), 1, 16)
    assert images(train) == vae_train and images(holdout) == images(seen["vae"][0].holdout_dataset)
    # The latent cache holds the same images (in the same order, so the same labels).
    run(train_unet, tiny_config(tmp_path, **seeds))
    assert [int(y) for y in seen["unet"][1]["label"]] == [seen["vae"][1][i]["label"] for i in range(len(vae_train))]
    # ...and data.seed is what decides it.
    run(train_vae, tiny_config(tmp_path, **seeds, **{"data.seed": 1}))
    assert images(seen["vae"][1]) != vae_train


def test_a_step_the_gradient_scaler_skips_does_not_count(tmp_path, monkeypatch):
    """fp16's gradient scaler skips the optimizer step when the gradients hold inf/NaN. accelerate makes no scaler on
    the CPU (fp16 there needs a GPU), so a stand-in for AcceleratedOptimizer.step skips the second optimizer step the
    way the scaler does: the weights stay, step_was_skipped is True, and accelerate's scheduler does not step. The
    skipped step must not count: no step number, EMA update, log or checkpoint, and a resume still lands exactly."""
    from accelerate.optimizer import AcceleratedOptimizer
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    optimizer_step, attempts = AcceleratedOptimizer.step, []

    def skipping_step(self, closure=None):
        if self.gradient_state.sync_gradients:
            attempts.append(len(attempts) + 1)
            self._is_overflow = len(attempts) == 2
            if self._is_overflow:
                return
        optimizer_step(self, closure)

    options = {"vae.train.use_ema": True}
    with monkeypatch.context() as patch:
        patch.setattr(AcceleratedOptimizer, "step", skipping_step)
        micro_batches = count_micro_batches(patch, VAETask)
        metrics = run(train_vae, tiny_config(tmp_path / "straight", **options))
    assert metrics["skipped_steps"] == 1 and len(attempts) == 7
    assert micro_batches == [0, 1, 1, 2, 3, 4, 5]  # step 2 took two tries
    ckpt = tmp_path / "straight" / "vae" / "checkpoints"
    assert json.loads((ckpt / "checkpoint-3" / "training_state.json").read_text()) == {
        "global_step": 3, "epoch": 0, "batches_in_epoch": 4}
    with safe_open(str(ckpt / "checkpoint-6" / "ema.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["ema_state"])["optimization_step"] == 6
    assert torch.load(ckpt / "checkpoint-6" / "scheduler.bin", weights_only=True)["last_epoch"] == 6
    acc = EventAccumulator(str(tmp_path / "straight" / "vae" / "logs" / "vae"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]

    checkpoint_3 = crash_after_step(3, tmp_path / "straight", tmp_path / "resumed", "vae")
    metrics = run(train_vae, tiny_config(tmp_path / "resumed", **options,
                                         **{"vae.train.resume_from_checkpoint": "latest"}))
    assert metrics["start_step"] == 3 and metrics["skipped_steps"] == 0
    assert files_of(tmp_path / "resumed" / "vae" / "checkpoints" / "checkpoint-3") == checkpoint_3
    assert_same_checkpoint(ckpt / "checkpoint-6", tmp_path / "resumed" / "vae" / "checkpoints" / "checkpoint-6")
