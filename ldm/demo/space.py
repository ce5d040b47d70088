"""The files that let a model travel with its demo: app.py, serving.py and requirements.txt in the model folder (so the model
repository runs its own page with `python app.py`), a Space card for a Hugging Face Space that serves it, and a
Demo section in the model card that links the Space.

The app needs no ldm: app.py and serving.py are ldm/demo's, which import only gradio, torch, diffusers, numpy and PIL and
loads ldm's pipeline code from the model repository itself (diffusers' remote code). ldm is not on PyPI, so a Space
could not install it anyway; the requirements are the released diffusers stack.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

APP = Path(__file__).with_name("app.py")
APP_FILES = ("app.py", "serving.py")  # the demo's code, copied as they are
DEMO_HEADING = "## Demo"


def _at_least(package: str) -> str:
    """`package>=X.Y` for the installed release (what the app was tested with), plain `package` if not installed."""
    try:
        major_minor = ".".join(version(package).split(".")[:2])
    except PackageNotFoundError:
        return package
    return f"{package}>={major_minor}"


def requirements(folder: str | Path) -> str:
    """requirements.txt for the app of `folder`: torch and diffusers, transformers for text models. Gradio itself
    comes from the Space's `sdk_version` (or `pip install gradio` locally)."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    lines = ["torch", _at_least("diffusers"), _at_least("safetensors"), "accelerate", "numpy", "pillow"]
    if "text_encoder" in index:
        lines.insert(2, _at_least("transformers"))
    return "\n".join(lines) + "\n"


def space_card(model_id: str, title: str) -> str:
    """README.md of a Space that serves `model_id` (app.py reads the model from its `models:` entry)."""
    try:
        sdk_version = f"sdk_version: {version('gradio')}\n"
    except PackageNotFoundError:
        sdk_version = ""
    return (f"---\ntitle: {title}\nemoji: 🖼️\nsdk: gradio\n{sdk_version}app_file: app.py\nmodels:\n- {model_id}\n"
            f"pinned: false\n---\n\nThe web demo of [{model_id}](https://huggingface.co/{model_id}), made with "
            "`ldm push --with_demo`.\n")


def demo_section(space_id: str | None) -> str:
    online = (f"Try it in the browser: [{space_id}](https://huggingface.co/spaces/{space_id}) (a Gradio Space).\n\n"
              if space_id else "")
    return (f"{DEMO_HEADING}\n\n{online}This repository carries its web demo (`app.py`, `serving.py`, `requirements.txt`); to run "
            "it on your machine: `pip install gradio -r requirements.txt && python app.py`, then open "
            "http://127.0.0.1:7860. With ldm installed: `ldm demo --model DIR_OR_HUB_ID`.\n")


def write_demo_files(folder: str | Path, space_id: str | None = None) -> list[Path]:
    """Copy app.py and serving.py, write requirements.txt and put (or replace) the Demo section of README.md in
    `folder`."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json; expected a folder written by save_pretrained")
    for name in APP_FILES:
        shutil.copyfile(APP.with_name(name), folder / name)
    (folder / "requirements.txt").write_text(requirements(folder))
    written = [folder / name for name in (*APP_FILES, "requirements.txt")]
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text()
        # Replace an earlier Demo section (up to the next level-2 heading), else append one.
        pattern = re.compile(rf"^{DEMO_HEADING}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
        section = demo_section(space_id)
        text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
        card.write_text(text)
        written.append(card)
    return written
