"""Property-based tests (hypothesis): any config value or combination, pipeline argument or command line is either
accepted and works, or rejected with a ConfigError / ValueError (or, on the command line, status 2) whose message
names the key or argument; never a traceback from inside torch, diffusers or argparse's caller."""

import dataclasses
import os
import re
import typing

import pytest
import torch
from helpers import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pipeline import tiny_pipeline

from ldm.cli import main
from ldm.config import ConfigError, RunConfig, config_from_argv, load_config
from ldm.models import build_unet, build_vae

# The same 40 examples every run, so a CI failure is reproducible; LDM_FUZZ_EXAMPLES=N draws N new ones (a soak).
SOAK = int(os.environ.get("LDM_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=SOAK or 40, deadline=None, derandomize=not SOAK,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def leaf_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        keys += leaf_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [f"{prefix}{f.name}"]
    return keys


KEYS = leaf_keys()
# The model-size keys get small values, so an accepted config builds its networks in milliseconds.
SIZES = [k for k in KEYS if k.endswith((".block_out_channels", "layers_per_block", "latent_channels",
                                        "norm_num_groups", "attention_head_dim", "sample_size", "in_channels",
                                        ".dropout", ".attention", "data.resolution", "hidden_size", "num_heads"))]
small = st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 16, 24, 32])
values = st.one_of(
    small, st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=6), st.lists(small, max_size=4), st.lists(st.booleans(), max_size=4),
    st.sampled_from(["no", "5e-4", "null", "[1, 2]", "yes", "nan", "-inf", "1e400", "[]", "{a: 1}", "latest"]),
)
size_values = st.one_of(small, st.lists(small, max_size=3), st.lists(st.booleans(), max_size=3),
                        st.floats(-1, 2), st.none(), st.sampled_from(["8", "x", "[16,16]"]))
overrides = st.dictionaries(st.sampled_from(KEYS), values, max_size=3) | st.dictionaries(
    st.sampled_from(SIZES), size_values, min_size=1, max_size=3)
KEY_IN_MESSAGE = re.compile("|".join(re.escape(k) for k in sorted(KEYS, key=len, reverse=True)))


@FUZZ
@given(overrides)
def test_fuzzed_config_is_valid_or_a_config_error_naming_a_key(tmp_path, changes):
    """On top of configs/tiny.yaml: load, validate, then build the two networks as training does first."""
    changes = {"output_dir": str(tmp_path), **changes}
    try:
        cfg = load_config(REPO / "configs/tiny.yaml", changes)
        channels = 3 if cfg.data.color_mode == "rgb" else 1
        vae = build_vae(cfg.vae.model, channels, cfg.data.resolution)
        build_unet(cfg.denoiser.model, vae)
    except ConfigError as e:
        assert KEY_IN_MESSAGE.search(str(e)), f"{e} names no config key"


argument = st.one_of(st.sampled_from(["--train.max_steps", "--data.resolution=12", "--config", "--output_dir",
                                      "--dry_run", "--train.learning_rate=5e-4", "--vae.model.latent_channels=0",
                                      "--no_such.key=1", "=", "--", "--train.seed", "x", "--train.mixed_precision=no"]),
                     st.text(max_size=5))


@FUZZ
@given(st.lists(argument, max_size=5))
def test_fuzzed_training_command_line_is_valid_or_names_the_argument(argv):
    try:
        config_from_argv(argv, stage="vae")
    except ConfigError as e:
        assert KEY_IN_MESSAGE.search(str(e)) or "argument" in str(e) or "override" in str(e) \
            or "config file" in str(e), str(e)
    except SystemExit as e:  # argparse: "error: argument --config: expected one argument", status 2
        assert e.code == 2


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(channels=1)


anything = st.one_of(st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.none(),
                     st.text(max_size=3), st.lists(st.integers(-1, 2), max_size=3), st.booleans())


@FUZZ
@given(batch_size=st.one_of(st.integers(-1, 3), anything), steps=st.one_of(st.integers(-1, 3), st.just(5000), anything),
       eta=st.one_of(st.floats(0, 1), anything), guidance_scale=st.one_of(st.just(1.0), anything),
       output_type=st.one_of(st.sampled_from(["pil", "np", "pt"]), anything),
       class_labels=st.one_of(st.none(), anything), generators=st.integers(0, 3))
def test_fuzzed_pipeline_arguments_give_images_or_a_value_error_naming_the_argument(
        pipe, batch_size, steps, eta, guidance_scale, output_type, class_labels, generators):
    kwargs = {"batch_size": batch_size, "num_inference_steps": steps, "eta": eta, "output_type": output_type}
    if guidance_scale != 1.0:
        kwargs["guidance_scale"] = guidance_scale
    if class_labels is not None:
        kwargs["class_labels"] = class_labels
    if generators:
        kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(generators)]
    try:
        out = pipe(**kwargs)
    except (ValueError, TypeError) as e:
        named = [name for name in (*kwargs, "generators") if name in str(e)]
        assert named, f"{type(e).__name__}: {e} names no argument of {kwargs}"
        return
    assert len(out.images) == batch_size


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, pipe):
    folder = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(folder)
    return folder


flag_values = {
    "--num_images": st.one_of(st.integers(-1, 3), st.text(max_size=3)),
    "--steps": st.one_of(st.integers(-1, 3), st.just(5000), st.text(max_size=3)),
    "--batch_size": st.one_of(st.integers(-1, 3), st.text(max_size=3)),
    "--seed": st.one_of(st.integers(-5, 2**70), st.text(max_size=3)),
    "--eta": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3)),
    "--scheduler": st.one_of(st.sampled_from(["ddim", "ddpm", "euler-a", "dpm++", "unipc"]), st.text(max_size=4)),
    "--timestep_spacing": st.sampled_from(["leading", "trailing", "linspace", "middle"]),
    "--guidance_scale": st.floats(allow_nan=True, allow_infinity=True),
    "--class_labels": st.text(max_size=4),
}


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(flag_values)), st.none(), max_size=4).flatmap(
    lambda chosen: st.fixed_dictionaries({flag: flag_values[flag] for flag in chosen})))
def test_fuzzed_sample_command_line_writes_a_grid_or_names_the_flag(model_dir, tmp_path, capsys, flags):
    flags = {"--num_images": 2, "--steps": 2, **flags}
    argv = ["sample", "--model", str(model_dir), "--out", str(tmp_path / "grid.png")]
    for flag, value in flags.items():
        argv += [f"{flag}={value}"]
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as e:  # argparse rejected a value: it names the argument itself
        status = e.code
    err = capsys.readouterr().err
    if status == 0:
        assert (tmp_path / "grid.png").is_file()
    else:
        assert status == 2 and any(flag in err for flag in flags), err


def test_output_dir_of_another_run_and_a_vae_of_other_data_are_named(tmp_path):
    """Combinations no single value shows: a run directory whose checkpoints have other shapes (fresh start or
    resume), and a VAE of other channels; each a ConfigError naming the keys, before any weights are read."""
    from helpers import run, tiny_config

    from ldm.train.unet import train_unet
    from ldm.train.vae import train_vae

    quick = {"vae.train.max_steps": 2, "vae.train.checkpointing_steps": 2, "vae.train.sample_every": 0}
    run(train_vae, tiny_config(tmp_path, **quick))
    other = {**quick, "vae.model.latent_channels": 2, "data.resolution": 32}
    for resume in (None, "latest"):
        with pytest.raises(ConfigError, match=r"data.resolution=16 \(now 32\), vae.model.latent_channels=4 \(now 2\)"):
            run(train_vae, tiny_config(tmp_path, **other, **{"vae.train.resume_from_checkpoint": resume}))
    # The autoencoder is fully convolutional: another resolution is fine, other channels are not.
    with pytest.raises(ConfigError, match="match data.color_mode to the VAE"):
        run(train_unet, tiny_config(tmp_path, **{"data.color_mode": "rgb"}))
