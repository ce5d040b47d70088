"""Shared by the training tests: the tiny config and a clean in-process run of one stage."""

from pathlib import Path

from accelerate.state import AcceleratorState

from ldm.config import load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(output_dir: Path, **overrides):
    return load_config(REPO / "configs/tiny.yaml", {"output_dir": str(output_dir), **overrides})


def run(fn, cfg):
    # Each run builds its own Accelerator; the process-wide state must not leak between runs.
    AcceleratorState._reset_state(reset_partial_state=True)
    return fn(cfg)
