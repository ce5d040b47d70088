"""YAML files and dotted command-line overrides mapped onto the config dataclasses.

Unknown keys and wrong types fail before any work with a message that names the key. Every value is read as text
and parsed by the type of the field it goes into, so `5e-4` is a float and `no` stays the string "no".
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ldm.config import bundled
from ldm.config.objective import fill_objective_defaults
from ldm.config.schema import ConfigError, DenoiserStageConfig, DistillConfig, RunConfig, VAEStageConfig
from ldm.config.validation import validate, validate_backbone_overrides


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


# YAML 1.1 (PyYAML) reads `no` as False and `5e-4` as a string; scalars are therefore read as text
# (yaml.BaseLoader) and parsed here by the type of the field they go into.
_NULL = {"null", "Null", "NULL", "~", ""}
_TRUE, _FALSE = {"true", "yes", "on"}, {"false", "no", "off"}


def _parse_text(text: str, tp: Any) -> Any:
    """`text` as a value of the scalar type `tp` (int, float, bool, None); raises ValueError if it is not one."""
    if tp is type(None) and text in _NULL:
        return None
    if tp is bool and text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    if tp is int:
        return int(text)
    if tp is float:
        value = float(text)
        # Python's float() also reads "nan" and "inf", which no field of ours accepts as a value.
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    raise ValueError(text)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it in that type.

    Text (from YAML files and command-line overrides) is parsed by the field's type: "5e-4" for a float, "50" for
    an int, true/false/yes/no/on/off for a bool, null/~ for an optional field; "no" for a str or Literal field
    stays "no". Python values are accepted as they are (ints for floats too).
    """
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value in _NULL)):
            return None  # before str: `null` in an optional path field means "not set", not a file called null
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if isinstance(value, str):  # an override such as --denoiser.model.attention=[true,false]
            value = _read_text(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and tp is not str:
        try:
            return _parse_text(value.strip(), tp)
        except ValueError:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}") from None
    if tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _read_text(text: str) -> Any:
    """YAML structure (mappings, lists) with every scalar kept as text, for `_coerce` to parse by field type."""
    try:
        return yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read {text!r} as YAML: {e}") from e


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}"
        )
    values = {name: _coerce(data[name], hints[name], f"{prefix}{name}") for name in data}
    return cls(**values)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override --{dotted_key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


# Former names of config sections, read as the current ones from YAML files, overrides and the config.yaml saved in old
# checkpoints and run folders, so that they keep loading and resuming. The denoiser stage was `unet` until it could
# also be a transformer; its folders (<output_dir>/unet/) and train_unet.py keep the old name.
SECTION_ALIASES = {"unet": "denoiser"}


def renamed_sections(tree: dict, source: str = "config") -> dict:
    """`tree` (a whole run config as nested dicts) with former section names replaced by the current ones; a
    ConfigError if `source` gives one section under both names, which would leave it unclear which one holds."""
    tree = dict(tree)
    for old, new in SECTION_ALIASES.items():
        if old in tree:
            if new in tree:
                raise ConfigError(f"{source}: sections {old!r} and {new!r} are both given; {old!r} is the former name "
                                  f"of {new!r}: merge them into {new!r}")
            tree[new] = tree.pop(old)
    return tree


def _renamed_key(dotted_key: str) -> str:
    """A dotted key with a former section name replaced: "unet.train.seed" -> "denoiser.train.seed"."""
    head, _, rest = dotted_key.partition(".")
    return f"{SECTION_ALIASES[head]}.{rest}" if rest and head in SECTION_ALIASES else dotted_key


def stage_section(stage: str) -> str:
    """The config section of a training stage: "vae" -> "vae", "unet" (train_unet.py's stage) -> "denoiser"."""
    return SECTION_ALIASES.get(stage, stage)


def _stage_keys(stage: str) -> set[str]:
    stages = {"vae": VAEStageConfig, "denoiser": DenoiserStageConfig, "distill": DistillConfig}
    stage_cls = stages[stage_section(stage)]
    return {f.name for f in dataclasses.fields(stage_cls)} - {f.name for f in dataclasses.fields(RunConfig)}


def parse_overrides(args: list[str], stage: str | None = None) -> dict[str, Any]:
    """Turn `--a.b=1` / `--a.b 1` arguments into {"a.b": 1}; each value is parsed by the type of its field
    (`--train.learning_rate=5e-4` is a float, `--train.mixed_precision=no` the string "no"); keys that are not
    fields are kept as text for `load_config` to reject by name.

    Inside the script that trains `stage`, keys of that stage may drop the prefix: `--train.max_steps=50` means
    `--vae.train.max_steps=50` in train_vae.py and `--denoiser.train.max_steps=50` in train_unet.py (stage "unet",
    whose section is `denoiser`). Keys under a former section name (`--unet.train.seed`) are read as the current one.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --train.max_steps=50")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override --{body} has no value; write --{body}=VALUE")
        if stage is not None and key.split(".")[0] in _stage_keys(stage):
            key = f"{stage_section(stage)}.{key}"
        key = _renamed_key(key)
        field_type = _field_type(key)
        overrides[key] = raw if field_type is None else _coerce(raw, field_type, key)
        i += 1
    return overrides


def _field_type(dotted_key: str) -> Any:
    """The annotation of RunConfig's field at `dotted_key` ("denoiser.train.seed" -> int), None if there is none."""
    tp: Any = RunConfig
    for part in dotted_key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return None if dataclasses.is_dataclass(tp) else tp


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (a file, or the name of one that ships with ldm: "digits"; or the defaults), apply dotted
    overrides, and validate the result."""
    tree: dict = {}
    if path is not None:
        path = bundled.config_path(path)
        try:
            tree = _read_text(path.read_text()) or {}
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data, vae, denoiser, ...)")
        tree = renamed_sections(tree, str(path))
    for key, value in (overrides or {}).items():
        _set_dotted(tree, _renamed_key(key), value)
    cfg = from_dict(RunConfig, tree)
    validate(cfg)
    validate_backbone_overrides(cfg, overrides or {})
    fill_objective_defaults(cfg)  # after the checks, which tell a key given from one left null
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def config_from_argv(argv: list[str], stage: str, prog: str | None = None) -> tuple[RunConfig, bool]:
    """Parse a training script's command line: --config FILE, --output_dir DIR, --dry_run, dotted overrides.

    Returns the validated config and whether this is a dry run (print the resolved config and stop).
    """
    import argparse

    section = stage_section(stage)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"Train the {section} stage of a latent diffusion model.",
        epilog="Any config key can be overridden: --data.resolution=64 --train.max_steps=50 (--train.* and other "
        f"{section}-stage keys may drop the '{section}.' prefix).",
    )
    parser.add_argument("--config", help="YAML config file, or the name of a config that ships with ldm "
                        f"({', '.join(bundled.names())}) (default: built-in defaults = digits)")
    parser.add_argument("--output_dir", help="run directory (overrides output_dir in the config)")
    parser.add_argument("--dry_run", action="store_true", help="print the resolved config and exit")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest, stage=stage)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    return load_config(args.config, overrides), args.dry_run
