"""Preemption with data-loader workers on: a scheduler (Slurm, Kubernetes) sends SIGTERM to every process of the
job, the loader workers included. The workers must leave the signal to their training process, which finishes its
step, writes a checkpoint and exits 143 (ldm.train.faults). Both stages, 1 and 2 processes."""

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, trained_tiny_vae
from test_crashes import family, launch, wait_for_checkpoint

from ldm.train.checkpoint import verify_checksums
from ldm.train.loader import make_train_loader

WORKERS = 2


def test_loader_workers_outlive_stop_signals_from_outside(tmp_path):
    """SIGTERM and SIGINT sent to the workers by another process (not their parent, which PyTorch's own worker
    handler would let through) leave them running: the epoch ends normally."""
    cfg = tiny_config(tmp_path, **{"data.num_workers": WORKERS})
    loader = make_train_loader(torch.utils.data.TensorDataset(torch.arange(64.0)), None, cfg, cfg.vae.train)
    batches = iter(loader)
    # Batches come from the workers in turn: once each has delivered one, each has run its worker_init_fn (a signal
    # that lands while a worker is still starting meets PyTorch's handler, not ours).
    first = [next(batches) for _ in range(WORKERS)]
    for worker in batches._workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.5)  # time for a worker that does not ignore them to die
    rest = list(batches)
    assert torch.cat([*(b[0] for b in first), *(b[0] for b in rest)]).sort().values.equal(torch.arange(64.0))
    assert all(worker.is_alive() for worker in batches._workers)


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory) -> Path:
    return trained_tiny_vae(tmp_path_factory.mktemp("vae"))


def signal_every_process_group(pid: int, signum: int) -> list[int]:
    """`signum` to the process group of `pid` and of each of its descendants, as a scheduler that stops a job does
    (torchrun runs each training process in a session of its own); returns the processes signalled."""
    job = family(pid)
    for group in {os.getpgid(member) for member in job}:
        os.killpg(group, signum)
    return job


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_sigterm_to_the_whole_job_with_loader_workers_checkpoints_and_exits_143(trained_vae, tmp_path, stage,
                                                                                processes):
    out, log = tmp_path / "run", tmp_path / "run.log"
    checkpoints = out / stage / "checkpoints"
    args = ["--config", str(Path(__file__).resolve().parents[1] / "configs/tiny.yaml"), "--output_dir", str(out),
            f"--data.num_workers={WORKERS}", "--train.max_steps=2000", "--train.checkpointing_steps=3",
            "--train.sample_every=0", "--train.report_to=none"]
    proc = launch(stage, processes, 0, args + ([f"--denoiser.vae_path={trained_vae}"] if stage == "unet" else []), log)
    try:
        wait_for_checkpoint(proc, checkpoints, 3)  # training is under way, its loader workers are up
        job = signal_every_process_group(proc.pid, signal.SIGTERM)
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert len(job) >= (1 + WORKERS) * processes, f"the loader workers were not running: {job}"
    assert status == 128 + signal.SIGTERM, text[-3000:]
    assert "killed by signal" not in text and "exited unexpectedly" not in text
    # Every training process stopped at the same step boundary, after writing a complete checkpoint of it.
    stopped = re.findall(r"SIGTERM received: stopped at step (\d+) after writing (\S+)\.", text)
    assert len(stopped) == processes and len(set(stopped)) == 1, text[-3000:]
    step, path = stopped[0]
    assert int(step) >= 3 and Path(path) == checkpoints / f"checkpoint-{step}"
    verify_checksums(Path(path))
    deadline = time.monotonic() + 30  # no process of the job is left behind, loader workers included
    while any(running(pid) for pid in job):
        assert time.monotonic() < deadline, [pid for pid in job if running(pid)]
        time.sleep(0.1)
