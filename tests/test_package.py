"""The package outside the repository: `ldm train vae|unet` (and `python -m ldm`), and the configs that ship inside
the package, found by name. (.ci/wheel_check installs a built wheel in a fresh environment and trains with it.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ldm.cli import main, run_training
from ldm.config import ConfigError, bundled, load_config
from ldm.eval.evaluation import resolve_data

REPO = Path(__file__).resolve().parent.parent


def test_ldm_train_is_the_training_script(capsys):
    """`ldm train STAGE ARGS` resolves the same config as `train_STAGE.py ARGS` (shown by --dry_run)."""
    for stage in ("vae", "unet"):
        args = ["--config", str(REPO / "configs/tiny.yaml"), "--output_dir", "/tmp/x", "--train.max_steps=7"]
        assert run_training(stage, [*args, "--dry_run"]) == 0
        script = capsys.readouterr().out
        assert main(["train", stage, *args, "--dry_run"]) == 0
        assert capsys.readouterr().out == script
        assert "max_steps: 7" in script


def test_ldm_train_help_is_fast_and_names_the_command():
    """`ldm train unet --help` (through `python -m ldm`, as `accelerate launch -m ldm` runs it) imports no torch."""
    code = ("import sys, runpy; sys.argv = ['ldm', 'train', 'unet', '--help']\n"
            "try: runpy.run_module('ldm', run_name='__main__')\n"
            "except SystemExit as e: assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ldm train unet") and "--config" in result.stdout


def test_ldm_train_refuses_an_unknown_stage(capsys):
    with pytest.raises(SystemExit):
        main(["train", "classifier"])
    assert "invalid choice: 'classifier'" in capsys.readouterr().err


def test_every_config_ships_in_the_package_and_loads_by_name(tmp_path, monkeypatch):
    """configs/ is the package's ldm/configs/; each config loads by name, from any folder."""
    assert (REPO / "configs").resolve() == bundled.CONFIG_DIR
    assert bundled.names() == sorted(p.stem for p in (REPO / "ldm/configs").glob("*.yaml"))
    assert "digits" in bundled.names() and "tiny" in bundled.names()
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for name in bundled.names():
        assert load_config(name) == load_config(REPO / "ldm/configs" / f"{name}.yaml"), name
    tiny = load_config(REPO / "configs/tiny.yaml")
    assert load_config("tiny.yaml") == load_config("configs/tiny.yaml") == tiny


def test_a_file_of_that_name_wins_over_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/tiny.yaml").write_text("output_dir: mine\n")
    (tmp_path / "tiny.yaml").write_text("output_dir: mine too\n")
    assert load_config("configs/tiny.yaml").output_dir == "mine"
    assert load_config("tiny.yaml").output_dir == "mine too"
    assert load_config("tiny").output_dir == "runs/tiny"  # a bare name is not a file here


def test_an_unknown_config_names_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for wrong in ("digitz", "configs/digitz.yaml", "elsewhere/digits.yaml", "digits.json"):
        with pytest.raises(ConfigError, match=r"does not exist, and it names none of the configs .*digits, "):
            load_config(wrong)


def test_evaluation_data_may_be_a_shipped_config_unless_a_folder_has_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data("digits", 1, 32) == resolve_data(str(REPO / "configs/digits.yaml"), 1, 32)
    (tmp_path / "digits").mkdir()
    assert resolve_data("digits", 1, 32).source == "folder"
    with pytest.raises(FileNotFoundError, match="nor a config that ships with ldm"):
        resolve_data("digitz", 1, 32)
