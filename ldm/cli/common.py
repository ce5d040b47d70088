"""What every `ldm` sub-command shares: the user-error exception, path checks, the sampler names."""

from __future__ import annotations

import os

# The keys of `ldm.schedulers.SCHEDULERS`, spelled out here because importing that module pulls in diffusers and
# `--help` must stay fast; tests/test_cli_sample.py checks that the two agree.
SCHEDULER_NAMES = ("ddpm", "ddim", "dpm++", "dpm++sde", "unipc", "euler", "euler-a")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # ldm.schedulers.TIMESTEP_SPACINGS, for the same reason


class CLIError(Exception):
    """A user error: `main` prints the message (no traceback) and exits with status 2."""


def check_exists(flag: str, path: str, marker: str | None = None) -> None:
    if not os.path.exists(path):
        raise CLIError(f"{flag} {path!r} does not exist")
    if marker and not os.path.isfile(os.path.join(path, marker)):
        raise CLIError(f"{flag} {path!r} has no {marker}")
