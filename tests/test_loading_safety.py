"""Loading safety: truncated or altered weights and checkpoints are named before anything is read, pickled state is
read only from checksummed checkpoint folders, pickled weights are never loaded, code in a model folder never runs."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import run, tiny_config
from test_pipeline import tiny_pipeline

from ldm.cli import main
from ldm.pipelines.loading import WeightsFileError, load_pipeline
from ldm.train.checkpoint import CHECKSUMS, CheckpointError
from ldm.train.vae import train_vae


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def alter_header(path: Path) -> None:
    """Change a tensor's shape in the JSON header (same length): the offsets no longer fit the data."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 1 and v["shape"][0] < 9)
    old = json.dumps(header[name]["shape"]).replace(" ", "")
    new = json.dumps([header[name]["shape"][0] + 1]).replace(" ", "")
    assert data[8:8 + n].count(old.encode()) >= 1
    patched = data[8:8 + n].replace(f'"{name}":{{"dtype":"F32","shape":{old}'.encode(),
                                    f'"{name}":{{"dtype":"F32","shape":{new}'.encode())
    assert patched != data[8:8 + n]
    path.write_bytes(data[:8] + patched + data[8 + n:])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, alter_header, lambda p: p.write_bytes(b"")])
def test_damaged_pipeline_weights_are_named(tmp_path, capsys, damage):
    folder = tmp_path / "pipeline"
    tiny_pipeline(channels=1).save_pretrained(folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    damage(weights)
    with pytest.raises(WeightsFileError, match=rf"{weights}.*truncated or was modified"):
        load_pipeline(folder)
    capsys.readouterr()
    assert main(["sample", "--model", str(folder), "--out", str(tmp_path / "grid.png"), "--steps", "2"]) == 2
    assert str(weights) in capsys.readouterr().err


def test_pickled_weights_and_folder_code_are_never_run(tmp_path):
    """A folder of .bin (pickle) weights is refused; a pipeline file changed to run code is not imported."""
    pickled = tmp_path / "pickled"
    tiny_pipeline(channels=1).save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(OSError, match="safetensors"):
        load_pipeline(pickled)
    folder = tmp_path / "pipeline"
    tiny_pipeline(channels=1).save_pretrained(folder)
    marker = tmp_path / "code-ran"
    code = folder / "pipeline_latent_diffusion.py"
    code.write_text(f"open({str(marker)!r}, 'w').close()\n" + code.read_text())
    load_pipeline(folder)
    assert not marker.exists()


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run(train_vae, tiny_config(out, **{"vae.train.max_steps": 3, "vae.train.sample_every": 0}))
    return out


def resume_from(checkpoint: Path, out: Path):
    return run(train_vae, tiny_config(out, **{"vae.train.max_steps": 4, "vae.train.sample_every": 0,
                                              "vae.train.resume_from_checkpoint": str(checkpoint)}))


@pytest.mark.parametrize("name, damage, message", [
    ("model.safetensors", truncate, "is truncated or was changed"),
    ("optimizer.bin", flip_a_byte, r"was changed after it was written \(sha256 differs\)"),
    ("random_states_0.pkl", lambda p: p.unlink(), "is missing from the checkpoint"),
    ("extra.pkl", lambda p: torch.save({"x": 1}, p), "was not part of the checkpoint"),
    (CHECKSUMS, lambda p: p.unlink(), "its pickled optimizer and RNG states are not read"),
])
def test_tampered_checkpoint_is_named_before_anything_is_unpickled(checkpoint_run, tmp_path, monkeypatch, name,
                                                                   damage, message):
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint_run / "vae" / "checkpoints" / "checkpoint-3", checkpoint)
    damage(checkpoint / name)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was read from a checkpoint that failed its checks")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match=message) as error:
        resume_from(checkpoint, tmp_path / "resumed")
    assert str(checkpoint / name) in str(error.value) or name == CHECKSUMS


def test_intact_checkpoint_resumes(checkpoint_run, tmp_path):
    checkpoint = checkpoint_run / "vae" / "checkpoints" / "checkpoint-3"
    sums = json.loads((checkpoint / CHECKSUMS).read_text())
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "training_state.json",
            "config.yaml"} <= set(sums)
    assert resume_from(checkpoint, tmp_path / "resumed")["start_step"] == 3
