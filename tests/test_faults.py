"""Faults injected into in-process training runs: NaN/Inf losses and gradients, non-finite weights, a stop signal
(SIGTERM, SIGINT) at a step, a checkpoint or model write that fails. Each must end as ldm.train.faults and
ldm.train.checkpoint promise: nothing saved is lost, and the error says what to do."""

import errno
import json
import os
import signal

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from diffusers.training_utils import EMAModel
from helpers import REPO, run, tiny_config
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_training import files_of

from ldm.cli import run_training
from ldm.train.checkpoint import CheckpointError, verify_checksums
from ldm.train.faults import NumericalError, StopSignals, TrainingInterrupted
from ldm.train.unet import UNetTask, train_unet
from ldm.train.vae import VAETask, train_vae

QUIET = {"vae.train.sample_every": 0, "denoiser.train.sample_every": 0}


def inject(monkeypatch, task_cls, fault):
    """Call fault(call_index, loss, task) on every micro-batch loss; it returns the loss to use."""
    calls, compute_loss = [], task_cls.compute_loss

    def faulty(self, batch, step):
        loss, logs = compute_loss(self, batch, step)
        calls.append(step)
        return fault(len(calls), loss, self), logs

    monkeypatch.setattr(task_cls, "compute_loss", faulty)
    return calls


def snapshot(task) -> dict:
    accelerator = task.accelerator
    model = accelerator.unwrap_model(task.modules["model"])
    optimizer = accelerator._optimizers[0].optimizer
    return {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "moments": {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state.items()}}


def same_snapshot(a: dict, b: dict) -> bool:
    weights = all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    moments = a["moments"].keys() == b["moments"].keys() and all(
        torch.equal(v, b["moments"][i][k]) for i, s in a["moments"].items() for k, v in s.items())
    return weights and moments


def test_nan_loss_and_nan_gradient_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    """Calls 3 (NaN loss) and 5 (finite loss, NaN gradient through a hook) are skipped: weights, AdamW moments and EMA
    stay, the step count does not move, and train/bad_steps logs them; the run still takes its 6 steps."""
    snapshots, ema_steps = {}, []

    def fault(call, loss, task):
        snapshots[call] = snapshot(task)
        if call == 3:
            return loss * float("nan")
        if call == 5:
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss

    calls = inject(monkeypatch, VAETask, fault)
    ema_step = EMAModel.step
    monkeypatch.setattr(EMAModel, "step", lambda self, params: (ema_steps.append(1), ema_step(self, params)))
    out = tmp_path / "run"
    metrics = run(train_vae, tiny_config(out, **QUIET, **{"vae.train.use_ema": True, "vae.train.log_every": 1}))
    assert metrics["bad_steps"] == 2 and len(calls) == 8
    assert calls == [0, 1, 2, 2, 3, 3, 4, 5]  # steps 3 and 4 (0-based 2 and 3) took two tries each
    assert same_snapshot(snapshots[3], snapshots[4]) and same_snapshot(snapshots[5], snapshots[6])
    assert not same_snapshot(snapshots[2], snapshots[3])  # ...while a good step does change them
    assert len(ema_steps) == 6
    events = EventAccumulator(str(out / "vae" / "logs" / "vae"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/bad_steps")] == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 2),
                                                                              (6, 2)]
    assert all(torch.isfinite(torch.tensor(e.value)) for e in events.Scalars("train/loss"))


def test_max_bad_steps_in_a_row_stop_with_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    inject(monkeypatch, VAETask, lambda call, loss, task: loss * float("nan") if call >= 4 else loss)
    status = run_training("vae", ["--config", str(REPO / "configs/tiny.yaml"), "--output_dir", str(tmp_path),
                                  "--train.max_bad_steps=3", "--train.checkpointing_steps=2", "--train.sample_every=0"])
    error = capsys.readouterr().err
    assert status == 1
    assert "3 tries in a row at optimizer step 4" in error and "the last step taken is 3" in error
    assert f"the last good checkpoint is {tmp_path / 'vae' / 'checkpoints' / 'checkpoint-2'}" in error
    assert not (tmp_path / "vae" / "model").exists()


def poison_after_step(monkeypatch, poisoned_step: int):
    """After the real optimizer step number `poisoned_step`, one weight becomes NaN (an overflowed update)."""
    steps, optimizer_step = [], AcceleratedOptimizer.step

    def step(self, closure=None):
        optimizer_step(self, closure)
        if self.gradient_state.sync_gradients:
            steps.append(1)
            if len(steps) == poisoned_step:
                with torch.no_grad():
                    self.optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    monkeypatch.setattr(AcceleratedOptimizer, "step", step)


@pytest.mark.parametrize("poisoned_step, checkpointing_steps, what", [(4, 2, "checkpoint-4"),
                                                                       (6, 0, "the final model")])
def test_nan_weights_are_never_saved(tmp_path, monkeypatch, poisoned_step, checkpointing_steps, what):
    poison_after_step(monkeypatch, poisoned_step)
    cfg = tiny_config(tmp_path, **QUIET, **{"vae.train.checkpointing_steps": checkpointing_steps})
    with pytest.raises(NumericalError, match=rf"at step {poisoned_step} the weights hold NaN or Inf \(first: "
                                             rf"model\.vae\.encoder.*{what} was not saved"):
        run(train_vae, cfg)
    checkpoints = tmp_path / "vae" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*")) == (["checkpoint-2"] if checkpointing_steps else [])
    assert not (tmp_path / "vae" / "model").exists()
    for path in checkpoints.glob("*"):
        assert all(torch.isfinite(w).all() for w in load_file(path / "model.safetensors").values())


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    run(train_vae, tiny_config(out, **QUIET, **{"vae.train.max_steps": 2}))
    return out


@pytest.mark.parametrize("stage, signum", [("vae", signal.SIGTERM), ("unet", signal.SIGINT)])
def test_stop_signal_checkpoints_the_step_boundary_and_resumes_exactly(vae_run, tmp_path, monkeypatch, stage,
                                                                       signum):
    """The signal arrives in the first of the two micro-batches of step 3: step 3 is finished, checkpoint-3 written
    (no checkpoint is scheduled), and the run stops; resumed, it ends bitwise where an uninterrupted run ends."""
    task_cls, train = (VAETask, train_vae) if stage == "vae" else (UNetTask, train_unet)
    options = {**QUIET, f"{stage}.train.gradient_accumulation_steps": 2, f"{stage}.train.checkpointing_steps": 0,
               f"{stage}.train.use_ema": True, "denoiser.vae_path": str(vae_run / "vae" / "model")}
    run(train, tiny_config(tmp_path / "straight", **options))
    handler_before = signal.getsignal(signum)  # SIG_IGN where the tests run in the background (nohup, CI runners)
    with monkeypatch.context() as patch:
        calls = inject(patch, task_cls, lambda call, loss, task: (os.kill(os.getpid(), signum) if call == 5 else None,
                                                                  loss)[1])
        with pytest.raises(TrainingInterrupted, match=rf"{signal.Signals(signum).name} received: stopped at step 3 "
                                                      r"after writing .*checkpoint-3.*resume_from_checkpoint=latest") as e:
            run(train, tiny_config(tmp_path / "resumed", **options))
    assert e.value.exit_code == 128 + signum and calls == [0, 0, 1, 1, 2, 2]
    assert signal.getsignal(signum) == handler_before  # the run's handler is removed again
    checkpoints = tmp_path / "resumed" / stage / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-3"]
    assert json.loads((checkpoints / "checkpoint-3" / "training_state.json").read_text())["global_step"] == 3
    metrics = run(train, tiny_config(tmp_path / "resumed", **options,
                                     **{f"{stage}.train.resume_from_checkpoint": "latest"}))
    assert metrics["start_step"] == 3
    model = "vae/model/diffusion_pytorch_model.safetensors" if stage == "vae" else \
        "pipeline/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "straight" / model), load_file(tmp_path / "resumed" / model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_repeated_sigterm_is_one_request_and_a_second_sigint_interrupts():
    """Under torchrun a training process gets the scheduler's SIGTERM and the one the launcher forwards: it must
    still checkpoint. A person who presses Ctrl-C twice wants out at once."""
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM
    with StopSignals() as signals, pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)


def fail_writes(monkeypatch, target, name: str, exception: OSError, from_call: int):
    calls, original = [], getattr(target, name)

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) >= from_call:
            raise exception
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


@pytest.mark.parametrize("where", ["optimizer", "weights"])
def test_failed_checkpoint_write_is_a_clear_error_and_keeps_the_previous_one(tmp_path, monkeypatch, capsys, where):
    """Disk full while torch.save writes the optimizer state, or no permission while safetensors writes the weights,
    of the second checkpoint (step 4): the run stops with status 1 and a message naming both checkpoints, and
    checkpoint-2 is exactly as it was written (its checksums verify), with no temporary leftovers."""
    import accelerate.utils.other

    if where == "optimizer":  # torch.save writes 3 files per checkpoint (optimizer, LR scheduler, RNG states)
        fail_writes(monkeypatch, torch, "save", OSError(errno.ENOSPC, "No space left on device"), from_call=4)
    else:  # safetensors writes 1 (the model)
        fail_writes(monkeypatch, accelerate.utils.other, "safe_save_file",
                    PermissionError(errno.EACCES, "Permission denied"), from_call=2)
    status = run_training("vae", ["--config", str(REPO / "configs/tiny.yaml"), "--output_dir", str(tmp_path),
                                  "--train.checkpointing_steps=2", "--train.sample_every=0"])
    error = capsys.readouterr().err
    checkpoints = tmp_path / "vae" / "checkpoints"
    assert status == 1
    assert f"could not write checkpoint {checkpoints / 'checkpoint-4'}" in error
    assert ("No space left on device" if where == "optimizer" else "Permission denied") in error
    assert "already saved are intact (checkpoint-2)" in error and "resume_from_checkpoint=latest" in error
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-2"]
    verify_checksums(checkpoints / "checkpoint-2")


def test_failed_model_write_keeps_the_checkpoints(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    fail_writes(monkeypatch, AutoencoderKL, "save_pretrained", OSError(errno.ENOSPC, "No space left on device"), 1)
    cfg = tiny_config(tmp_path, **QUIET)
    with pytest.raises(CheckpointError, match="could not write the trained vae model.*No space left on device"):
        run(train_vae, cfg)
    kept = tmp_path / "vae" / "checkpoints" / "checkpoint-6"
    before = files_of(kept)
    monkeypatch.undo()
    # Resuming from the last checkpoint writes the model without training again.
    metrics = run(train_vae, tiny_config(tmp_path, **QUIET, **{"vae.train.resume_from_checkpoint": "latest"}))
    assert metrics["start_step"] == 6 and (tmp_path / "vae" / "model").is_dir()
    assert files_of(kept) == before
