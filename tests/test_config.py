import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ldm.config import ConfigError, RunConfig, config_from_argv, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.output_dir.startswith("runs/")


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("vae:\n  train:\n    max_stepz: 10\n")
    with pytest.raises(ConfigError, match=r"vae\.train\.max_stepz"):
        load_config(path)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key trainer"):
        load_config(None, {"trainer.max_steps": 3})


@pytest.mark.parametrize(
    "key, value, pattern",
    [
        ("vae.train.max_steps", "ten", r"vae\.train\.max_steps: expected int"),
        ("vae.train.batch_size", 2.5, r"vae\.train\.batch_size: expected int"),
        ("denoiser.train.use_ema", "maybe", r"denoiser\.train\.use_ema: expected bool"),
        ("denoiser.train.learning_rate", "fast", r"denoiser\.train\.learning_rate: expected float, got 'fast'"),
        ("denoiser.train.learning_rate", "nan", r"denoiser\.train\.learning_rate: expected float"),
        ("vae.train.max_steps", "2.5", r"vae\.train\.max_steps: expected int, got '2.5'"),
        ("vae.train.mixed_precision", False, r"vae\.train\.mixed_precision: expected one of 'no'"),
        ("data.source", "imagenet", r"data\.source: expected one of 'digits' \| 'folder' \| 'hub'"),
        ("denoiser.model.block_out_channels", [32, "x"], r"denoiser\.model\.block_out_channels\[1\]"),
        ("vae.train.max_steps", 0, r"vae\.train\.max_steps: must be positive"),
        ("data.resolution", 30, r"data\.resolution: must be a positive multiple of 8"),
    ],
)
def test_wrong_values_name_the_key(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, {key: value})


def test_int_accepted_for_float_and_null_for_optional():
    cfg = load_config(None, {"denoiser.train.learning_rate": 1, "denoiser.diffusion.snr_gamma": None})
    assert cfg.denoiser.train.learning_rate == 1.0 and isinstance(cfg.denoiser.train.learning_rate, float)
    assert cfg.denoiser.diffusion.snr_gamma is None


def test_override_text_is_read_by_field_type():
    overrides = parse_overrides(["--train.learning_rate=5e-4", "--train.mixed_precision=no", "--train.use_ema=no",
                                 "--train.max_steps", "50", "--train.resume_from_checkpoint=null",
                                 "--diffusion.snr_gamma=5", "--data.path=123", "--model.attention=[true, no, off]"],
                                stage="unet")
    assert overrides == {"denoiser.train.learning_rate": 5e-4, "denoiser.train.mixed_precision": "no",
                         "denoiser.train.use_ema": False, "denoiser.train.max_steps": 50,
                         "denoiser.train.resume_from_checkpoint": None, "denoiser.diffusion.snr_gamma": 5.0,
                         "data.path": "123", "denoiser.model.attention": [True, False, False]}
    assert type(overrides["denoiser.train.learning_rate"]) is float
    assert type(overrides["denoiser.diffusion.snr_gamma"]) is float
    cfg = load_config(None, overrides)
    assert cfg.denoiser.train.learning_rate == 5e-4 and cfg.denoiser.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"denoiser\.train\.learning_rate: expected float, got '5e-4x'"):
        parse_overrides(["--train.learning_rate=5e-4x"], stage="unet")
    with pytest.raises(ConfigError, match=r"denoiser\.train\.mixed_precision: expected one of 'no' \| 'fp16' \| "
                                          r"'bf16'"):
        parse_overrides(["--train.mixed_precision=fp32"], stage="unet")
    with pytest.raises(ConfigError, match=r"unknown config key denoiser\.train\.learning_rat"):
        load_config(None, parse_overrides(["--train.learning_rat=5e-4"], stage="unet"))


def test_yaml_file_values_are_read_by_field_type(tmp_path):
    """YAML 1.1 reads `5e-4` as a string and `no` as False; each value here goes by its field's type instead."""
    path = tmp_path / "run.yaml"
    path.write_text("vae:\n  train:\n    learning_rate: 5e-4\n    mixed_precision: no\n    use_ema: yes\n"
                    "    max_grad_norm: 1\n    resume_from_checkpoint: ~\n    checkpoints_total_limit: null\n"
                    "unet:\n  train:\n    mixed_precision: 'bf16'\n  diffusion:\n    snr_gamma: 5.0e+0\n"
                    "data:\n  path: 2024\n  source: folder\n")
    cfg = load_config(path)
    t = cfg.vae.train
    assert (t.learning_rate, t.mixed_precision, t.use_ema, t.max_grad_norm) == (5e-4, "no", True, 1.0)
    assert type(t.learning_rate) is float and type(t.max_grad_norm) is float
    assert t.resume_from_checkpoint is None and t.checkpoints_total_limit is None
    assert cfg.denoiser.train.mixed_precision == "bf16" and cfg.denoiser.diffusion.snr_gamma == 5.0
    assert cfg.data.path == "2024"
    # A saved config (written by save_config) reads back to the same values.
    from ldm.config import save_config
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    path.write_text("vae:\n  train:\n    learning_rate: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"vae\.train\.learning_rate: expected float, got \['1', '2'\]"):
        load_config(path)
    path.write_text("vae: [unclosed\n")
    with pytest.raises(ConfigError, match="run.yaml: cannot read"):
        load_config(path)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="lpips_weights"):
        load_config(None, {"vae.loss.perceptual_weight": 1.0})
    with pytest.raises(ConfigError, match="data.path: required"):
        load_config(None, {"data.source": "folder"})
    with pytest.raises(ConfigError, match="denoiser.model.attention: needs one entry per level"):
        load_config(None, {"denoiser.model.attention": [True]})
    with pytest.raises(ConfigError, match="downsample by 16, which does not divide data.resolution=40"):
        load_config(None, {"data.resolution": 40, "vae.model.block_out_channels": [32, 32, 32, 32, 32]})


def test_stage_shorthand_overrides():
    assert parse_overrides(["--train.max_steps=50"], stage="vae") == {"vae.train.max_steps": 50}
    assert parse_overrides(["--train.batch_size", "32"], stage="unet") == {"denoiser.train.batch_size": 32}
    assert parse_overrides(["--data.resolution=64"], stage="unet") == {"data.resolution": 64}
    assert parse_overrides(["--denoiser.model.attention=[true,false]"], stage="vae") == {
        "denoiser.model.attention": [True, False]
    }
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.max_steps"], stage="vae")


def test_argv_overrides_file_and_output_dir():
    cfg, dry = config_from_argv(
        ["--config", str(REPO / "configs/digits.yaml"), "--output_dir", "/tmp/x", "--train.max_steps=50",
         "--train.batch_size=32"],
        stage="unet",
    )
    assert not dry
    assert cfg.output_dir == "/tmp/x"
    assert cfg.denoiser.train.max_steps == 50 and cfg.denoiser.train.batch_size == 32
    assert cfg.vae.train.max_steps == load_config(REPO / "configs/digits.yaml").vae.train.max_steps


def _with_former_section_name(tmp_path) -> Path:
    """configs/tiny.yaml as written before the denoiser section was renamed: `unet:`, and no model.type."""
    tree = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    tree["unet"] = tree.pop("denoiser")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_former_unet_section_loads_as_denoiser(tmp_path):
    """Configs written before the rename (`unet:` in YAML, `--unet.x=` overrides) load as they did."""
    old = _with_former_section_name(tmp_path)
    assert load_config(old) == load_config(REPO / "configs/tiny.yaml")
    cfg = load_config(old, parse_overrides(["--unet.train.max_steps=5", "--train.batch_size=2"], stage="unet"))
    assert cfg.denoiser.train.max_steps == 5 and cfg.denoiser.train.batch_size == 2
    assert cfg.denoiser.model.type == "unet"  # every model of that time was a UNet
    # A new-style file with an old-style override and the other way round: the same section, both ways.
    assert load_config(REPO / "configs/tiny.yaml", {"unet.train.seed": 3}).denoiser.train.seed == 3
    assert load_config(old, {"denoiser.train.seed": 3}).denoiser.train.seed == 3
    cfg, _ = config_from_argv(["--config", str(old), "--unet.sample_steps=3", "--model.layers_per_block=2"],
                              stage="unet")
    assert cfg.denoiser.sample_steps == 3 and cfg.denoiser.model.layers_per_block == 2


def test_both_section_names_in_one_file_is_an_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("unet:\n  sample_steps: 3\ndenoiser:\n  sample_steps: 4\n")
    with pytest.raises(ConfigError, match=r"sections 'unet' and 'denoiser' are both given"):
        load_config(path)


def test_script_rejects_bad_key_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train_vae.py"), "--output_dir", str(tmp_path / "run"), "--train.max_stepz=5"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert result.returncode == 2
    assert "vae.train.max_stepz" in result.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_resolved_config():
    result = subprocess.run(
        [sys.executable, str(REPO / "train_unet.py"), "--config", str(REPO / "configs/tiny.yaml"), "--dry_run",
         "--train.max_steps=7"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["denoiser"]["train"]["max_steps"] == 7
    assert resolved["data"]["resolution"] == 16


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_decides_random_flip_and_says_why(path):
    """The schema leaves flips off (a wrong flip silently harms handed data), so each shipped config must choose
    for its data, with the reason in a comment on the same line."""
    lines = [line for line in path.read_text().splitlines() if line.strip().startswith("random_flip:")]
    assert len(lines) == 1, f"{path.name}: data.random_flip must be set explicitly"
    assert "#" in lines[0] and len(lines[0].split("#", 1)[1].strip()) > 10, f"{path.name}: say why in a comment"
