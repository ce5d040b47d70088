"""The autoencoder recipe keeps colour: a tiny autoencoder trained on saturated shapes on white reconstructs them in
colour (issue: L1-only autoencoders drew colourful objects on white in gray). The shapes come from
benchmarks/colour_sets.py, which needs nothing but PIL."""

import importlib.util
import json

import numpy as np
import pytest
from helpers import REPO, run, tiny_config

from ldm.train.vae import train_vae

_spec = importlib.util.spec_from_file_location("colour_sets", REPO / "benchmarks" / "colour_sets.py")
colour_sets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(colour_sets)


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    colour_sets.write_shapes(out, per_class=100, size=32, rng=np.random.default_rng(0))
    return out


def _train(tmp_path, shapes_folder, **loss):
    quiet = {f"vae.train.{k}": v for k, v in (("checkpointing_steps", 0), ("sample_every", 0), ("report_to", "none"))}
    cfg = tiny_config(tmp_path, **{
        "data.source": "folder", "data.path": str(shapes_folder), "data.color_mode": "rgb",
        "data.random_flip": True, "data.max_samples": None, "vae.train.max_steps": 600,
        "vae.train.lr_warmup_steps": 50, **quiet, **loss})
    run(train_vae, cfg)
    return json.loads((tmp_path / "vae" / "metrics.json").read_text())


@pytest.mark.slow
def test_tiny_autoencoder_keeps_the_colour_of_objects_on_white(tmp_path, shapes_folder):
    """Bounds: a gray reconstruction keeps 0 of the input's chroma and errs by the input's mean chroma (~60 here).
    Measured at these settings (docs/colour.md): L1 alone kept 0.11 at step 600 (error 59; 0.08-0.22 at every step
    up to 1,000 and three seeds of benchmarks/colour_cause.py); with the default chroma term (weight 1, 2x2 block
    means) 0.655 (error 31.3), with the per-pixel term 0.643 (32.9); a 300-step run is still gray (0.14)."""
    metrics = _train(tmp_path / "default", shapes_folder)
    assert metrics["holdout_chroma_kept"] > 0.5 and metrics["holdout_chroma_error"] < 40, metrics
    # The mechanism the loss's docstring names: without the squared chroma term the same run comes back gray.
    l1_only = _train(tmp_path / "l1", shapes_folder, **{"vae.loss.chroma_weight": 0.0})
    assert l1_only["holdout_chroma_kept"] < 0.3 and l1_only["holdout_chroma_error"] > 50, l1_only
