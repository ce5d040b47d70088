"""Real data-parallel training: both stages under `accelerate launch` with 2 CPU processes (DDP over gloo)."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_checkpoint, reference_lrs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
BATCH, ACCUMULATION, STEPS, PROCESSES = 4, 2, 4, 2


def free_port() -> int:
    with socket.socket() as s:  # other test runs on this machine may hold accelerate's default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(stage: str, prefix: Path, *overrides: str) -> list[dict]:
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    command = [launcher, "launch", "--multi_gpu", "--num_processes", str(PROCESSES), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(WORKER), stage, str(prefix), *overrides]
    # No ACCELERATE_USE_CPU and no train.cpu: a launch without GPUs must find the CPU by itself.
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [torch.load(f"{prefix}-rank{i}.pt") for i in range(PROCESSES)]


def assert_logged_loss_is_the_mean_over_processes(ranks: list[dict], log_dir: Path) -> None:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    # accelerate steps the prepared LR scheduler once per process per optimizer step: the logged LR must still be
    # the schedule's value at that optimizer step (warm-up 3, cosine to step 4).
    expected_lr = reference_lrs("cosine", 1e-3, 3, STEPS)
    assert [(e.step, e.value) for e in events.Scalars("train/lr")] == [
        (2, pytest.approx(expected_lr[1], rel=1e-6)), (4, pytest.approx(expected_lr[3], abs=1e-12))]
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(logged) == [2, 4]
    for log_step, value in logged.items():
        # Micro-batches of optimizer steps log_step-2 and log_step-1, averaged on each rank, then over the ranks.
        per_rank = [[loss for step, loss in r["losses"] if log_step - 2 <= step < log_step] for r in ranks]
        assert [len(losses) for losses in per_rank] == [2 * ACCUMULATION] * PROCESSES
        expected = sum(sum(losses) / len(losses) for losses in per_rank) / PROCESSES
        assert value == pytest.approx(expected, rel=1e-5)


def assert_data_parallel(ranks: list[dict]) -> None:
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == PROCESSES and r["device"].startswith("cpu") for r in ranks)
    # The data is sharded: each rank trained on its own batches, and together on exactly the global batch.
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]
    assert sum(r["images"] for r in ranks) == BATCH * PROCESSES * ACCUMULATION * STEPS
    # ...yet the gradients were all-reduced: every trained network is bitwise the same on both ranks.
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    for name, weights in ranks[0]["weights"].items():
        for key, value in weights.items():
            assert torch.equal(value, ranks[1]["weights"][name][key]), f"{name}.{key} differs between ranks"


def assert_ranks_augment_differently(ranks: list[dict]) -> None:
    """Each rank crops/flips its own examples, each with the generator of (data.seed, epoch, example index)."""
    drawn = [r["augmentations"] for r in ranks]  # the loader may have read one batch ahead
    assert all(len(d) >= BATCH * ACCUMULATION * STEPS for d in drawn)
    assert {seed for d in drawn for seed, _, _ in d} == {0} and {e for d in drawn for _, e, _ in d} == {0, 1}
    assert not set(drawn[0]) & set(drawn[1])


@pytest.mark.slow
def test_two_process_ddp_trains_both_stages_in_lockstep(tmp_path):
    run = tmp_path / "run"
    common = [f"--train.max_steps={STEPS}", f"--train.batch_size={BATCH}",
              f"--train.gradient_accumulation_steps={ACCUMULATION}", "--train.checkpointing_steps=2",
              "--train.sample_every=2", "--train.log_every=2"]
    # Stage 1 with the patch discriminator switched on half-way (DDP must cope with a module unused before), random
    # crops and flips, and 48 images: 6 micro-batches per rank and epoch, so step 3 ends the first epoch.
    vae_options = [*common, "--loss.disc_weight=0.5", "--loss.disc_start=2", "--loss.disc_layers=1",
                   "--data.crop=random", "--data.random_flip=true", "--data.max_samples=48",
                   "--train.lr_warmup_steps=3", "--train.lr_scheduler=cosine"]
    vae = launch_two_processes("vae", tmp_path / "vae", f"--output_dir={run}", *vae_options)
    assert set(vae[0]["weights"]) == {"model", "discriminator"}
    assert_data_parallel(vae)
    assert_ranks_augment_differently(vae)
    # Every process wrote its RNG state into the checkpoint before it was renamed into place.
    ckpt = run / "vae" / "checkpoints" / f"checkpoint-{STEPS}"
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert not list((run / "vae" / "checkpoints").glob("*.tmp"))
    assert (run / "vae" / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert_logged_loss_is_the_mean_over_processes(vae, run / "vae" / "logs" / "vae")

    # A crash right after step 2 (mid-epoch), then a 2-process resume: it must end where the straight run did.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "vae" / "checkpoints" / f"checkpoint-{STEPS}")
    shutil.rmtree(resumed / "vae" / "model")
    again = launch_two_processes("vae", tmp_path / "vae-resumed", f"--output_dir={resumed}", *vae_options,
                                 "--train.resume_from_checkpoint=latest")
    assert again[0]["start_step"] == 2 and [r["images"] for r in again] == [BATCH * ACCUMULATION * 2] * PROCESSES
    assert_same_checkpoint(ckpt, resumed / "vae" / "checkpoints" / f"checkpoint-{STEPS}")

    unet = launch_two_processes("unet", tmp_path / "unet", f"--output_dir={run}", *common, "--train.use_ema=false")
    assert_data_parallel(unet)
    assert (run / "pipeline" / "model_index.json").is_file()
    assert len(list((run / "unet" / "logs" / "unet").glob("events.out.tfevents.*"))) == 1  # main process only
