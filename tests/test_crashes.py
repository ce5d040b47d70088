"""SIGKILL at random moments, and in the middle of writing a checkpoint: the same command with
--train.resume_from_checkpoint=latest, run again after each kill (as a requeued job is), continues from the last
complete checkpoint and ends with the weights of a run that never stopped. Both stages, 1 and 2 processes.

LDM_CRASH_KILLS=N raises the number of random kills per run (default 1) for a longer soak.
"""

import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, run, tiny_config
from safetensors.torch import load_file
from test_distributed import free_port

from ldm.train.unet import train_unet
from ldm.train.vae import train_vae

WORKER = REPO / "tests" / "kill_worker.py"
RANDOM_KILLS = int(os.environ.get("LDM_CRASH_KILLS", "1"))
# A kill comes at most 6 steps after the newest checkpoint, plus the steps of half a second: room for all of them.
EVERY = 3
STEPS = 9 * (RANDOM_KILLS + 2)
MODEL = {"vae": "vae/model/diffusion_pytorch_model.safetensors",
         "unet": "pipeline/unet/diffusion_pytorch_model.safetensors"}
OPTIONS = {"max_steps": STEPS, "checkpointing_steps": EVERY, "checkpoints_total_limit": 2, "sample_every": 0,
           "log_every": 5, "use_ema": True}


def arguments(stage: str, out: Path, vae: Path | None) -> list[str]:
    args = ["--config", str(REPO / "configs/tiny.yaml"), "--output_dir", str(out),
            *(f"--train.{key}={value}" for key, value in OPTIONS.items()), "--train.resume_from_checkpoint=latest"]
    return args + ([f"--denoiser.vae_path={vae}"] if vae else [])


def launch(stage: str, processes: int, kill_in_save: int, args: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, str(WORKER)]
    if processes > 1:
        launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        command = [launcher, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                   str(WORKER)]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONUNBUFFERED="1")  # the log holds everything printed before a kill
    # A session of its own: a test may signal its process group as a scheduler does, and must not signal pytest.
    return subprocess.Popen([*command, stage, str(kill_in_save), *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def family(pid: int) -> list[int]:
    """A process and all its descendants, parents first (torchrun starts its workers in sessions of their own, so a
    process group does not hold them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    members, todo = [], [pid]
    while todo:
        members.append(todo.pop())
        todo += parents.get(members[-1], [])
    return members


def kill_all(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure would."""
    for member in reversed(family(pid)):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def complete_steps(checkpoints: Path) -> list[int]:
    found = [re.fullmatch(r"checkpoint-(\d+)", p.name) for p in checkpoints.glob("checkpoint-*")]
    return sorted(int(m.group(1)) for m in found if m)


def wait_for_checkpoint(proc: subprocess.Popen, checkpoints: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while not (checkpoints / f"checkpoint-{step}").is_dir():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before checkpoint-{step}"
        assert time.monotonic() < deadline, f"no checkpoint-{step} in 300 s"
        time.sleep(0.01)


def killed_and_resumed(stage: str, processes: int, out: Path, vae: Path | None, rng: random.Random,
                       kills: list[str]) -> list[dict]:
    """Runs of the same command: one per kill ("in-save": in the middle of writing a random checkpoint; "random": at
    a random moment after a random checkpoint), then one to the end. Returns what each run did."""
    checkpoints = out / stage / "checkpoints"
    args = arguments(stage, out, vae)
    runs = []
    for number, kind in enumerate([*kills, "finish"]):
        latest = (complete_steps(checkpoints) or [0])[-1]
        target = latest + EVERY * rng.randint(1, 2)
        assert target < STEPS, "no room left for another kill"
        log = out.parent / f"{out.name}-{stage}-{number}.log"
        proc = launch(stage, processes, target if kind == "in-save" else 0, args, log)
        if kind == "random":
            wait_for_checkpoint(proc, checkpoints, target)
            time.sleep(rng.uniform(0.0, 0.5))  # somewhere in the next steps, maybe inside a checkpoint write
            kill_all(proc.pid)
        status = proc.wait(timeout=600)
        text = log.read_text()
        resumed = re.search(r"resumed from \S+checkpoint-(\d+) at step (\d+)", text)
        runs.append({"kind": kind, "status": status, "latest_before": latest, "target": target,
                     "resumed_from": int(resumed.group(1)) if resumed else 0,
                     "tmp_after": sorted(p.name for p in checkpoints.glob("*.tmp")), "log": text[-3000:]})
        if kind == "finish":
            assert status == 0, text[-3000:]
        else:
            assert status != 0, f"{kind} kill came too late: {text[-2000:]}"
    return runs


def assert_resumed_from_the_last_complete_checkpoint(runs: list[dict]) -> None:
    for after in runs[1:]:
        assert after["resumed_from"] == after["latest_before"], after["log"]
    for in_save, after in itertools.pairwise(runs):
        if in_save["kind"] == "in-save":
            # Killed while writing checkpoint-<target>: its .tmp was left behind, the next run went back further.
            assert in_save["tmp_after"] == [f"checkpoint-{in_save['target']}.tmp"]
            assert after["resumed_from"] < in_save["target"]


def assert_same_model(a: Path, b: Path, stage: str) -> None:
    wa, wb = load_file(a / MODEL[stage]), load_file(b / MODEL[stage])
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the killed and resumed run ended with other weights"


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    run(train_vae, tiny_config(out, **{f"vae.train.{k}": v for k, v in OPTIONS.items()}))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_sigkill_single_process_resumes_to_the_same_weights(trained_vae, tmp_path, stage):
    vae = trained_vae / "vae" / "model" if stage == "unet" else None
    if stage == "vae":
        reference = trained_vae
    else:
        reference = tmp_path / "reference"
        run(train_unet, tiny_config(reference, **{f"denoiser.train.{k}": v for k, v in OPTIONS.items()},
                                    **{"denoiser.vae_path": str(vae)}))
    rng = random.Random(f"{stage}-1")
    runs = killed_and_resumed(stage, 1, tmp_path / "killed", vae, rng, ["in-save"] + ["random"] * RANDOM_KILLS)
    assert all(r["status"] == -signal.SIGKILL for r in runs[:-1])
    assert_resumed_from_the_last_complete_checkpoint(runs)
    assert_same_model(reference, tmp_path / "killed", stage)
    assert not list((tmp_path / "killed" / stage / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_sigkill_two_processes_resumes_to_the_same_weights(trained_vae, tmp_path, stage):
    vae = trained_vae / "vae" / "model" if stage == "unet" else None
    reference = tmp_path / "reference"
    straight = launch(stage, 2, 0, arguments(stage, reference, vae), tmp_path / "reference.log")
    assert straight.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    # One kill each (they cost a 2-process start-up apiece): mid-write for the autoencoder, at random for the UNet.
    kills = ["in-save"] if stage == "vae" else ["random"] * RANDOM_KILLS
    runs = killed_and_resumed(stage, 2, tmp_path / "killed", vae, random.Random(f"{stage}-2"), kills)
    assert_resumed_from_the_last_complete_checkpoint(runs)
    assert_same_model(reference, tmp_path / "killed", stage)
