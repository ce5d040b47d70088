"""The documentation site: the generated configuration reference against the schema, the navigation against docs/,
the docs extra against docs/requirements.txt. (CI builds the site itself with `mkdocs build --strict`.)"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from ldm.config import RunConfig, load_config, parse_overrides
from ldm.config.loading import _type_name
from ldm.config.objective import DEFAULTS as OBJECTIVE_DEFAULTS
from ldm.config.reference import _cell, keys, markdown, yaml_text

REPO = Path(__file__).resolve().parent.parent
SCHEMA = (REPO / "ldm/config/schema.py").read_text()


def schema_fields(cls: type = RunConfig, prefix: str = "") -> dict[str, tuple[typing.Any, dataclasses.Field]]:
    """Every leaf field of the schema by dotted key, walked with dataclasses.fields alone."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= schema_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = (hints[f.name], f)
    return out


def filled_by_objective(name: str) -> bool:
    """A key whose null the loader fills with the default objective's value (ldm.config.objective): the reference shows
    the schema's null, and the key's comment says what null means."""
    return name.removeprefix("denoiser.") in OBJECTIVE_DEFAULTS["ddpm"]


def test_reference_lists_every_key_of_the_schema_with_its_type_default_and_comment():
    fields = schema_fields()
    listed = {key.name: key for key in keys()}
    assert len(listed) == len(keys())  # each key once
    assert sorted(listed) == sorted(fields)
    defaults = load_config()
    page = markdown()
    for name, (tp, f) in fields.items():
        key = listed[name]
        value = defaults
        for part in name.split("."):
            value = getattr(value, part)
        assert key.type == _type_name(tp), name
        if filled_by_objective(name):
            assert key.default == "null" and "null: " in key.comment, name
        else:
            assert key.default == yaml_text(value), name
        assert key.comment, f"{name} has no trailing # comment in ldm/config/schema.py"
        assert f"{f.name}" in SCHEMA and f"  # {key.comment}" in SCHEMA, name
        assert f"| `{name}` | `{key.type}` | `{key.default}` |" in page, name


def test_each_default_as_written_in_the_reference_reads_back_as_the_default():
    """The reference's default column is what a config file would say: the loader parses it back to the default."""
    defaults = load_config()
    for key in keys():
        value = defaults
        for part in key.name.split("."):
            value = getattr(value, part)
        parsed = parse_overrides([f"--{key.name}={key.default}"])
        if filled_by_objective(key.name):  # null, which loading turns into the default
            assert parsed == {key.name: None} and load_config(overrides=parsed) == defaults, key.name
        else:
            assert parsed == {key.name: value}, key.name


def test_reference_cells_keep_the_table_whole():
    """A `|` or `<` in a comment would split a row or open an HTML tag; the generator escapes both."""
    assert _cell("x | y, in <output_dir>") == "x \\| y, in &lt;output_dir>"
    rows = [line for line in markdown().splitlines() if line.startswith("| `")]
    assert len(rows) == len(keys())
    assert all(line.replace("\\|", "").count("|") - _code_pipes(line) == 5 for line in rows)


def _code_pipes(line: str) -> int:
    """Pipes inside code spans, which Python-Markdown's tables keep as text."""
    return sum(span.count("|") for span in line.split("`")[1::2])


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_of_docs_is_in_the_navigation_and_every_nav_entry_exists():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    pages = _nav_pages(config["nav"])
    generated = {"reference/configuration.md"}  # written by docs/hooks.py at build time
    on_disk = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    assert sorted(on_disk - set(pages)) == []
    assert sorted(set(pages) - on_disk - generated) == []
    assert len(pages) == len(set(pages))


def test_docs_requirements_repeat_the_docs_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]
    lines = [line for line in (REPO / "docs/requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert sorted(lines) == sorted(extra)
