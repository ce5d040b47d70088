"""Training that scales, on the CPU: bf16 runs of both stages, the TensorBoard logs read back, and the GPU options
(TF32, channels_last, SDPA attention, torch.compile, gradient checkpointing, fused AdamW) wired as configured."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import DynamoBackend
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from helpers import REPO, reference_lrs, run, tiny_config
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ldm.cli import run_training
from ldm.config import ConfigError, TrainConfig, VAELossConfig
from ldm.losses import vae_loss
from ldm.models import PatchDiscriminator, build_unet, build_vae
from ldm.objectives import ddpm as ddpm_objective
from ldm.train import conditioning, devices, logs
from ldm.train import spine as training
from ldm.train import unet as unet_trainer
from ldm.train import vae as vae_trainer
from ldm.train.unet import train_unet
from ldm.train.vae import KLAutoencoder, train_vae

SCALARS = ("train/loss", "train/lr", "train/grad_norm", "train/images_per_sec")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """Both tiny stages (6 steps, logs every 2, samples every 3) in bf16 autocast, the frozen VAE in bfloat16."""
    out = tmp_path_factory.mktemp("bf16")
    seen = {}

    def recording(build, key):
        def record_dtype(module, inputs, output):
            seen.setdefault(key, output.dtype)  # the first convolution's output dtype shows whether autocast is on

        def build_and_hook(*args):
            model = build(*args)
            (model.encoder.conv_in if hasattr(model, "encoder") else model.conv_in).register_forward_hook(record_dtype)
            return model
        return build_and_hook

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vae_trainer, "build_vae", recording(vae_trainer.build_vae, "vae_conv"))
        run(train_vae, tiny_config(out, **{"vae.train.mixed_precision": "bf16"}))

    def recording_loss(pred, target, *args):
        seen.setdefault("target", target.dtype)
        return diffusion_loss(pred, target, *args)

    def recording_encode(vae, images, *args, **kwargs):
        seen.setdefault("vae", vae.dtype)
        return encode(vae, images, *args, **kwargs)

    diffusion_loss, encode = ddpm_objective.diffusion_loss, unet_trainer.latents.encode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ddpm_objective, "diffusion_loss", recording_loss)  # the loss of the (default) DDPM objective
        mp.setattr(unet_trainer.latents, "encode", recording_encode)
        # The UNet stage builds its network through its conditioning (ldm.train.conditioning).
        mp.setattr(conditioning, "build_denoiser", recording(conditioning.build_denoiser, "unet_conv"))
        run(train_unet, tiny_config(out, **{"denoiser.train.mixed_precision": "bf16", "denoiser.vae_dtype": "bfloat16",
                                            "denoiser.latent_cache": False}))
    return out, seen


def events(run_dir: Path, stage: str) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / stage / "logs" / stage), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_tensorboard_logs_scalars_and_sample_grids(bf16_run, stage):
    acc = events(bf16_run[0], stage)
    for tag in SCALARS:
        assert [e.step for e in acc.Scalars(tag)] == [2, 4, 6], tag
        assert all(math.isfinite(e.value) for e in acc.Scalars(tag)), tag
    assert all(e.value > 0 for e in acc.Scalars("train/images_per_sec"))
    assert [e.step for e in acc.Images("samples")] == [3, 6]
    assert sorted(p.name for p in (bf16_run[0] / stage / "samples").glob("step-*.png")) == [
        "step-0000003.png", "step-0000006.png"]


def test_bf16_runs_save_float32_weights(bf16_run):
    out, seen = bf16_run
    # Both trained networks ran under bf16 autocast; the frozen VAE encoded in bfloat16, and the UNet still got
    # float32 latents (the targets are the float32 noise).
    assert seen == {"vae_conv": torch.bfloat16, "unet_conv": torch.bfloat16, "vae": torch.bfloat16,
                    "target": torch.float32}
    saved = [
        out / "vae" / "model" / "diffusion_pytorch_model.safetensors",
        out / "vae" / "checkpoints" / "checkpoint-6" / "model.safetensors",
        out / "unet" / "checkpoints" / "checkpoint-6" / "model.safetensors",
        out / "unet" / "checkpoints" / "checkpoint-6" / "ema.safetensors",
        out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors",
        out / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors",
    ]
    for path in saved:
        tensors = load_file(path)
        assert {t.dtype for t in tensors.values()} == {torch.float32}, path
        assert all(torch.isfinite(t).all() for t in tensors.values()), path


def test_logged_lr_follows_the_schedule_and_gradients_are_clipped(tmp_path, monkeypatch):
    """The VAE and its discriminator, 2 micro-batches per step, warm-up 3 + cosine over 5 steps: the logged LR is
    the schedule's value at each optimizer step, and each network's gradient reaches AdamW clipped to
    max_grad_norm, while the logs show the norms before clipping (both networks)."""
    max_norm, stepped = 0.01, []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        stepped.append([torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in group["params"]])).item()
                        for group in self.param_groups])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    run(train_vae, tiny_config(tmp_path, **{
        "vae.loss.disc_weight": 0.5, "vae.loss.disc_start": 0, "vae.loss.disc_layers": 1,
        "vae.train.gradient_accumulation_steps": 2, "vae.train.lr_warmup_steps": 3, "vae.train.lr_scheduler": "cosine",
        "vae.train.max_steps": 5, "vae.train.log_every": 1, "vae.train.max_grad_norm": max_norm,
        "vae.train.checkpointing_steps": 0, "vae.train.sample_every": 0}))
    acc = events(tmp_path, "vae")
    logged = [(e.step, e.value) for e in acc.Scalars("train/lr")]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5]
    expected = reference_lrs("cosine", 1e-3, 3, 5)
    assert [lr for _, lr in logged] == pytest.approx(expected, rel=1e-6)
    assert len(set(expected)) == 5  # warm-up and decay: every step's LR differs
    assert len(stepped) == 5  # one AdamW step per 2 micro-batches
    for model_norm, disc_norm in stepped:
        assert 0 < model_norm <= max_norm * (1 + 1e-5) and 0 < disc_norm <= max_norm * (1 + 1e-5)
    for tag in ("train/grad_norm", "train/discriminator_grad_norm"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4, 5]
        assert all(e.value > max_norm for e in acc.Scalars(tag)), tag  # so clipping did act


def test_grad_norm_is_averaged_per_optimizer_step():
    state = training.TrainState()
    logs.accumulate(state, {"loss": torch.tensor(1.0)})  # micro-batch 1 of 2: no optimizer step
    logs.accumulate(state, {"loss": torch.tensor(3.0)})
    logs.accumulate(state, {"grad_norm": torch.tensor(5.0)})  # the optimizer step
    assert state.loss_count == {"loss": 2, "grad_norm": 1}
    assert (state.loss_sum["loss"] / state.loss_count["loss"]).item() == 2.0
    assert (state.loss_sum["grad_norm"] / state.loss_count["grad_norm"]).item() == 5.0


def test_wandb_missing_fails_at_start_up(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="denoiser.train.report_to=wandb, but wandb is not installed"):
        training.check_trackers(TrainConfig(report_to="wandb"), "unet")
    training.check_trackers(TrainConfig(report_to="tensorboard"), "unet")
    status = run_training("vae", ["--config", str(REPO / "configs/tiny.yaml"), "--output_dir", str(tmp_path),
                                  "--train.report_to=wandb"])
    assert status == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "vae").exists()


def test_multi_process_launch_without_gpu_uses_the_cpu(monkeypatch):
    monkeypatch.setattr(devices, "_has_accelerator_device", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert devices.use_cpu(TrainConfig())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not devices.use_cpu(TrainConfig())
    assert devices.use_cpu(TrainConfig(cpu=True))
    monkeypatch.setattr(devices, "_has_accelerator_device", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not devices.use_cpu(TrainConfig())


def test_tf32_is_set_on_cuda_only():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        devices.configure_backends(TrainConfig(allow_tf32=True), torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32
        devices.configure_backends(TrainConfig(allow_tf32=True), torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        devices.configure_backends(TrainConfig(allow_tf32=False), torch.device("cuda"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_models(tmp_path):
    cfg = tiny_config(tmp_path)
    vae = build_vae(cfg.vae.model, in_channels=1, resolution=16)
    return cfg, vae, build_unet(cfg.denoiser.model, vae)


def test_attention_uses_pytorch_sdpa(tmp_path):
    _, vae, unet = tiny_models(tmp_path)
    for model in (vae, unet):
        processors = [m.processor for m in model.modules() if isinstance(m, Attention)]
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)


def test_channels_last_on_cuda_only_and_still_saves(tmp_path):
    _, _, unet = tiny_models(tmp_path)
    conv = unet.conv_in.weight
    devices.prepare_for_device(unet, TrainConfig(), torch.device("cpu"))
    assert conv.is_contiguous()
    # The layout change itself runs on any device; "cuda" only selects it.
    devices.prepare_for_device(unet, TrainConfig(), torch.device("cuda"))
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    unet.save_pretrained(tmp_path / "unet")
    assert load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"].equal(
        unet.conv_in.weight.detach())
    _, _, unet = tiny_models(tmp_path)
    devices.prepare_for_device(unet, TrainConfig(channels_last=False), torch.device("cuda"))
    assert unet.conv_in.weight.is_contiguous()


def test_fused_adamw_on_cuda_only(tmp_path):
    _, _, unet = tiny_models(tmp_path)

    class Task:
        def learning_rate(self, name, default):
            return default

    opt = training.build_optimizer(Task(), {"model": unet}, TrainConfig(), torch.device("cpu"))
    assert not opt.defaults["fused"]


@pytest.mark.parametrize("compile_", [False, True])
def test_compile_flag_selects_the_inductor_backend(tmp_path, compile_, monkeypatch):
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = training.make_accelerator(TrainConfig(compile=compile_, cpu=True, report_to="none"), tmp_path)
        expected = DynamoBackend.INDUCTOR if compile_ else DynamoBackend.NO
        assert accelerator.state.dynamo_plugin.backend == expected
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def loss_and_grads(model, loss_fn, checkpointing: bool, probe: torch.nn.Module):
    """Loss and gradients, with `probe` (a block inside a checkpointed region) run twice iff checkpointing."""
    devices.prepare_for_device(model, TrainConfig(gradient_checkpointing=checkpointing), torch.device("cpu"))
    calls = []
    hook = probe.register_forward_pre_hook(lambda *args: calls.append(1))
    model.train().zero_grad()
    torch.manual_seed(1)
    loss = loss_fn(model)
    loss.backward()
    hook.remove()
    assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    assert torch.allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], rtol=1e-4, atol=1e-6), name


def test_gradient_checkpointing_matches_plain_backward_unet(tmp_path):
    _, _, unet = tiny_models(tmp_path)
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])

    def loss_fn(model):
        return model(x, t).sample.square().mean()

    state = {k: v.clone() for k, v in unet.state_dict().items()}
    probe = unet.down_blocks[0].resnets[0]
    plain = loss_and_grads(unet, loss_fn, checkpointing=False, probe=probe)
    unet.load_state_dict(state)
    assert_same(plain, loss_and_grads(unet, loss_fn, checkpointing=True, probe=probe))


def test_gradient_checkpointing_matches_plain_backward_vae_with_discriminator(tmp_path):
    """The VAE loss takes autograd.grad at the decoder's last layer (adaptive GAN weight) before the backward."""
    _, vae, _ = tiny_models(tmp_path)
    model = KLAutoencoder(vae)
    torch.manual_seed(0)
    disc = PatchDiscriminator(1, num_layers=1)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    loss_cfg = VAELossConfig(disc_weight=0.5, disc_start=0)

    def loss_fn(m):
        recon, posterior = m(x)
        return vae_loss(loss_cfg, x, recon, posterior, step=0, last_layer=m.vae.decoder.conv_out.weight,
                        discriminator=disc)[0]

    state = {k: v.clone() for k, v in model.state_dict().items()}
    probe = vae.decoder.up_blocks[0]
    plain = loss_and_grads(model, loss_fn, checkpointing=False, probe=probe)
    model.load_state_dict(state)
    assert_same(plain, loss_and_grads(model, loss_fn, checkpointing=True, probe=probe))
