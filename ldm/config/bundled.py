"""The configs that ship inside the package (ldm/configs/*.yaml), found by name wherever ldm is installed.

    ldm train vae --config digits              # the digits recipe of the installed package
    ldm train vae --config configs/digits.yaml # a file, as in a checkout (configs/ there links to ldm/configs/)
    ldm train vae --config my_run.yaml         # any file of yours

A path that names an existing file is always that file. Otherwise a bare name (`digits`, `digits.yaml`) or a path
under a folder called configs/ (`configs/digits.yaml` typed outside a checkout, or where the link is a plain file, as
git writes it on systems without symbolic links) is the shipped config of that name.
"""

from __future__ import annotations

from pathlib import Path

from ldm.config.schema import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def names() -> list[str]:
    """The shipped configs' names: "digits", "tiny", ..."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def shipped(path_or_name: str | Path) -> Path | None:
    """The shipped config that `path_or_name` names (see the module docstring), or None if it names none."""
    path = Path(path_or_name)
    if path.parent not in (Path("."), Path("configs")) or path.suffix not in ("", ".yaml", ".yml"):
        return None
    candidate = CONFIG_DIR / f"{path.stem if path.suffix else path.name}.yaml"
    return candidate if candidate.is_file() else None


def config_path(path_or_name: str | Path) -> Path:
    """The config file `path_or_name` means: that file if it exists, else the shipped config it names."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    found = shipped(path)
    if found is None:
        raise ConfigError(f"config file {path} does not exist, and it names none of the configs that ship with ldm "
                          f"({', '.join(names())})")
    return found
