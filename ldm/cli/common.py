"""What every `ldm` sub-command shares: the user-error exception, path checks, the sampler names and swapping."""

from __future__ import annotations

import os

# The keys of `ldm.schedulers.SCHEDULERS`, spelled out here because importing that module pulls in diffusers and
# `--help` must stay fast; tests/test_cli_sample.py checks that the two agree.
SCHEDULER_NAMES = ("ddpm", "ddim", "dpm++", "dpm++sde", "unipc", "euler", "euler-a", "flow-euler", "flow-heun",
                   "lcm")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # ldm.schedulers.TIMESTEP_SPACINGS, for the same reason


class CLIError(Exception):
    """A user error: `main` prints the message (no traceback) and exits with status 2."""


def set_sampler(pipe, name: str | None, timestep_spacing: str | None = None, keep_saved: bool = False) -> str:
    """Give `pipe` the sampler `name` (--scheduler) built from its scheduler's config, so the training noise schedule
    (or a flow model's shift) stays and only the algorithm changes, with --timestep_spacing if given. Without a name:
    the saved sampler (`keep_saved`, as `ldm sample`) or the default for the model's objective (ddim for DDPM models,
    flow-euler for flow models, lcm for consistency students: `ldm.schedulers.CLI_SCHEDULERS`). Returns the name used
    ("saved" for the saved one); a sampler of another objective, or a spacing for a flow or consistency sampler, is a
    CLIError naming the flag."""
    from ldm.schedulers import FLOW_SCHEDULERS, default_scheduler, make_scheduler, objective_of

    config = pipe.scheduler.config
    if name is None and keep_saved:
        if timestep_spacing is not None:
            if objective_of(config) == "flow":
                raise CLIError(f"--timestep_spacing {timestep_spacing!r}: this is a flow-matching model, whose "
                               f"samplers ({', '.join(FLOW_SCHEDULERS)}) take no timestep spacing; leave it out")
            if objective_of(config) == "consistency":
                raise CLIError(f"--timestep_spacing {timestep_spacing!r}: this is a consistency-distilled student, "
                               "whose sampler (lcm) steps on the grid it was distilled on; leave it out")
            pipe.scheduler = type(pipe.scheduler).from_config(config, timestep_spacing=timestep_spacing)
        return "saved"
    name = name or default_scheduler(config)
    try:
        pipe.scheduler = make_scheduler(name, config, timestep_spacing, key="--scheduler",
                                        spacing_key="--timestep_spacing")
    except ValueError as e:
        raise CLIError(str(e)) from e
    return name


def check_exists(flag: str, path: str, marker: str | None = None) -> None:
    if not os.path.exists(path):
        raise CLIError(f"{flag} {path!r} does not exist")
    if marker and not os.path.isfile(os.path.join(path, marker)):
        raise CLIError(f"{flag} {path!r} has no {marker}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def image_files(flag: str, path: str) -> list[str]:
    """The image file `path`, or the image files of the folder `path` (sorted); a CLIError names `flag` if there are
    none or the path does not exist."""
    if not os.path.exists(path):
        raise CLIError(f"{flag} {path!r} does not exist")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise CLIError(f"{flag} {path!r} is a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    return [path]


def open_image(flag: str, path: str, mode: str):
    """Decode `path` as a PIL image in `mode` ("L" or "RGB"); a CLIError names `flag` if it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CLIError(f"{flag} {path!r} is not an image file PIL can read: {e}") from e
