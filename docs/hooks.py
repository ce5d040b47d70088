"""MkDocs hook: the pages generated from the code at each build (listed in mkdocs.yml's `hooks:`).

    reference/configuration.md   every config key with its type, default and comment (ldm/config/reference.py)

It runs the generator in a fresh interpreter, so that `mkdocs serve` (which watches ldm/) shows an edited schema
without a restart, and it needs only PyYAML from ldm's dependencies, so the docs build without torch installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
GENERATED = {"reference/configuration.md": "ldm.config.reference"}


def _run_module(module: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"python -m {module} failed:\n{result.stderr}")
    return result.stdout


def on_files(files: Files, config) -> Files:
    for page, module in GENERATED.items():
        files.append(File.generated(config, page, content=_run_module(module)))
    return files
