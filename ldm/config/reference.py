"""The configuration reference: every key of the schema with its type, default and comment, as Markdown.

Read from the dataclasses themselves (`dataclasses.fields`, the type hints the loader parses values by) and from the
trailing `# comment` of each field in schema.py, so the reference cannot drift from the code. The docs site writes
it at build time (docs/hooks.py, page reference/configuration.md); tests/test_docs.py checks it field by field.

    python -m ldm.config.reference > configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

from ldm.config.loading import SECTION_ALIASES, _type_name
from ldm.config.schema import RunConfig


@dataclass(frozen=True)
class Key:
    """One leaf field of the schema, as a config file or an override names it."""

    name: str  # dotted key, as in overrides: "vae.train.max_steps"
    type: str  # the type as the loader's error messages name it: "int | null", "'l1' | 'l2'"
    default: str  # the default written as in a YAML file: "null", "true", "[64, 128, 128]", "cosine"
    comment: str  # the field's trailing comment in schema.py


@dataclass(frozen=True)
class Section:
    """A dataclass-valued field (a mapping in YAML): `vae`, `vae.train`, `data.degrade`, ..."""

    name: str  # dotted name; "" for the top level (RunConfig)
    cls: type  # its dataclass
    doc: str  # the field's trailing comment, else the first paragraph of the class docstring
    keys: list[Key]  # its leaf fields, in declaration order


def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field declared in `cls`'s own source, by field name ("" where none).

    A field may span several lines (a long Literal); its comment is the one on the line where it ends.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    (class_def,) = ast.parse(source).body
    return {node.target.id: comments.get(node.end_lineno, "")
            for node in class_def.body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


def yaml_text(value: Any) -> str:
    """A default value written as a config file would write it (strings unquoted, as the loader reads them)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    return str(value)


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"field {f.name} has no default: every config key must have one")


def _class_doc(cls: type) -> str:
    """The first paragraph of `cls`'s own docstring ("" where it has none: dataclass writes its signature there)."""
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def sections(cls: type = RunConfig, name: str = "", doc: str = "") -> list[Section]:
    """`cls` and its dataclass-valued fields, recursively, depth first in declaration order."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    keys, nested = [], []
    for f in dataclasses.fields(cls):
        dotted = f"{name}.{f.name}" if name else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested += sections(tp, dotted, comments[f.name] or _class_doc(tp))
        else:
            keys.append(Key(dotted, _type_name(tp), yaml_text(default_of(f)), comments[f.name]))
    own = Section(name, cls, doc or _class_doc(cls), keys)
    return [own, *nested]


def keys(cls: type = RunConfig) -> list[Key]:
    """Every leaf key of `cls`, dotted, in the order of the reference."""
    return [key for section in sections(cls) for key in section.keys]


def _cell(text: str) -> str:
    """Plain text for a Markdown table cell: `|` would end the cell, `<` open an HTML tag. (Inside a code span a `|`
    is text to Python-Markdown's tables.)"""
    return text.replace("|", "\\|").replace("<", "&lt;")


def markdown() -> str:
    """The whole reference page."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from ldm/config/schema.py by ldm/config/reference.py at each docs build: edit the schema's",
        "     comments, not this page. -->",
        "",
        "One YAML file holds a whole run: the data both stages share, stage 1 (`vae`) and stage 2 (`denoiser`). Every "
        "key below can also be set on the command line with its dotted name (`--vae.train.max_steps=50`); inside a "
        "stage's command, that stage's keys may drop the prefix (`--train.max_steps=50`). Values are parsed by the "
        "key's type, unknown keys and wrong types are refused with a message naming the key."
        + "".join(f" The section `{old}:` of older configs and saved runs is read as `{new}:`."
                  for old, new in SECTION_ALIASES.items()),
        "",
        ("This page is generated from the dataclasses of `ldm/config/schema.py` and the comment on each of their "
         "fields, so it always matches the code that reads your config."),
    ]
    for section in sections():
        title = f"`{section.name}`" if section.name else "Top level"
        lines += ["", f"## {title}", ""]
        if section.doc:
            lines += [section.doc, ""]
        if not section.keys:
            continue
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{key.name}` | `{key.type}` | `{key.default}` | {_cell(key.comment)} |"
                  for key in section.keys]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
