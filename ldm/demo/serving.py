"""What a model folder can do, and running its pipelines for the demo's visitors: the part of the web demo that is
not its page (app.py).

Self-contained like app.py (gradio, torch, diffusers, numpy, PIL and the standard library only): `ldm push
--with_demo` copies both files into the model repository.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

# The samplers of `ldm sample --scheduler`: ldm/schedulers.py's SCHEDULERS with SCHEDULER_OPTIONS (a test checks
# that they agree). Each is built from the saved scheduler's config: the training noise schedule and timestep spacing
# stay, the algorithm changes. SAVED is the pipeline's own sampler, as `ldm sample` uses without --scheduler.
SAVED = "saved"
SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm++sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "flow-euler": (FlowMatchEulerDiscreteScheduler, {}),
    "flow-heun": (FlowMatchHeunDiscreteScheduler, {}),
    "lcm": (LCMScheduler, {}),
}
FLOW_SAMPLERS = ("flow-euler", "flow-heun")  # flow-matching models take these and only these (ldm/schedulers.py)
CONSISTENCY_SAMPLERS = ("lcm",)  # consistency students (ldm distill) take these and only these


def is_flow_config(config) -> bool:
    """Whether a saved scheduler config is a flow-matching model's (a `shift`, no betas; ldm.schedulers.objective_of)."""
    return "shift" in config and "beta_start" not in config


def family_of(config) -> str:
    """"flow", "consistency" (a student's LCMScheduler) or "ddpm": ldm.schedulers.objective_of."""
    if is_flow_config(config):
        return "flow"
    if "timestep_scaling" in config and config.get("_class_name", "LCMScheduler") == "LCMScheduler":
        return "consistency"
    return "ddpm"


def samplers_for(config) -> list[str]:
    """The sampler names that fit the model whose scheduler config this is: a flow model's, a consistency student's
    or the DDPM ones."""
    family = {**dict.fromkeys(FLOW_SAMPLERS, "flow"), **dict.fromkeys(CONSISTENCY_SAMPLERS, "consistency")}
    return [name for name in SAMPLERS if family.get(name, "ddpm") == family_of(config)]


TEXT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "LatentTextToImagePipeline",
                  "LatentTextDiTPipeline")
# The guidance slider starts at the model's own scale (model_index.json: `guidance_scale` of ldm's class models,
# `_guidance_scale` of text models, as ldm/pipelines/text_to_image.py explains), which ldm sample and ldm eval use
# too; folders saved before it get ldm's DEFAULT_GUIDANCE_SCALE (ldm/pipelines/pipeline_common.py; a test checks).
DEFAULT_GUIDANCE_SCALE = 1.5
GUIDANCE_KEYS = {"class": "guidance_scale", "text": "_guidance_scale"}
MAX_IMAGES = 16  # per click, so that one visitor cannot hold the shared queue for long


# The editing pipelines travel in ldm's model folders as files; the Edit tab appears where the folder has them.
EDIT_PIPELINES = {"img2img": ("pipeline_latent_img2img", "LatentImg2ImgPipeline"),
                  "inpaint": ("pipeline_latent_inpaint", "LatentInpaintPipeline")}
SUPERRES_PIPELINE = ("pipeline_latent_superres", "LatentSuperResolutionPipeline")


@dataclass(frozen=True)
class Capabilities:
    """What a model folder can do, read from its JSON files (and which pipeline files it carries) before any
    weights are loaded."""

    conditioning: str  # "none", "class" or "text"
    class_names: tuple[str, ...] = ()  # class models: a name per class id ("0", "1", ... if the folder names none)
    tasks: tuple[str, ...] = ("generate",)  # the tabs to show: "generate", "edit", "upscale"
    guidance_scale: float | None = None  # class and text models: the model's own classifier-free guidance scale
    steps: int = 50  # where the Steps sliders start: the model's own step count (a consistency student's), else 50
    title: str = "Latent diffusion"  # page heading


def read_capabilities(folder: str | os.PathLike, name: str | None = None) -> Capabilities:
    """Conditioning, class names and tasks of a saved folder (model_index.json, unet/ and vae/config.json); `name`
    (default: the folder's, or its run's for a run's pipeline/) titles the page."""
    folder = Path(folder).resolve()
    title = f"Latent diffusion: {name or (folder.parent.name if folder.name == 'pipeline' else folder.name)}"
    index = json.loads((folder / "model_index.json").read_text())
    class_name = index.get("_class_name")
    class_name = class_name[1] if isinstance(class_name, list) else class_name
    if class_name == "DiTPipeline":  # a class DiT saved for diffusers' DiTPipeline: ldm's keys are "_"-prefixed
        index = {**index, **{key[1:]: index[key] for key in ("_class_names", "_guidance_scale", "_num_classes")
                             if key in index}}
    guidance = index.get(GUIDANCE_KEYS["text" if class_name in TEXT_PIPELINES else "class"],
                         index.get("guidance_scale", DEFAULT_GUIDANCE_SCALE))  # a text DiT keeps `guidance_scale`
    # A consistency student's own step count: `num_inference_steps` of ldm's pipelines, `_num_inference_steps` where a
    # stock folder (Stable Diffusion, DiTPipeline) keeps it hidden.
    steps = int(index.get("num_inference_steps", index.get("_num_inference_steps", 50)))
    if class_name in TEXT_PIPELINES:
        return Capabilities("text", title=title, guidance_scale=guidance, steps=steps)
    # The denoiser is a UNet (unet/) or a DiT (transformer/, whose classes model_index.json counts).
    part = "transformer" if (folder / "transformer" / "config.json").is_file() else "unet"
    unet, vae = (json.loads((folder / name / "config.json").read_text()) for name in (part, "vae"))
    if unet["in_channels"] != vae["latent_channels"]:  # the UNet also takes the low-res image: super-resolution
        return Capabilities("none", tasks=("upscale",), title=title)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    # A consistency student only generates: editing rewinds and re-noises along a sampler that it does not follow.
    edit = family_of(scheduler) != "consistency" and all(
        (folder / f"{module}.py").is_file() for module, _ in EDIT_PIPELINES.values())
    tasks = ("generate", "edit") if edit else ("generate",)
    classes = index.get("num_classes") if part == "transformer" else None
    num_embeds = unet.get("num_class_embeds") if part == "unet" else None if classes is None else classes + 1
    if num_embeds is None:
        return Capabilities("none", tasks=tasks, title=title, steps=steps)
    names = index.get("class_names") or [str(i) for i in range(num_embeds - 1)]  # the last embedding is the null class
    return Capabilities("class", tuple(names), tasks=tasks, title=title, guidance_scale=guidance, steps=steps)


def folder_class(folder: str | os.PathLike, module: str, class_name: str) -> type:
    """A pipeline class from the folder's own code file (diffusers' dynamic modules, as remote code loads it)."""
    from diffusers.utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(str(folder), f"{module}.py", class_name=class_name, trust_remote_code=True)


def load_pipelines(folder: str | os.PathLike, caps: Capabilities, device: str | None = None) -> dict:
    """{task: pipeline} with diffusers alone: ldm's code from the folder (remote code, which is this same
    repository's), stock Stable Diffusion folders without any; the editing pipelines share the weights."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    remote = isinstance(index.get("_class_name"), list)  # ["pipeline_latent_diffusion", "LatentDiffusionPipeline"]
    if "upscale" in caps.tasks:
        pipes = {"upscale": folder_class(folder, *SUPERRES_PIPELINE).from_pretrained(str(folder))}
    elif index.get("_class_name") == "DiTPipeline":  # ldm's class DiT in a stock DiTPipeline folder: ldm's own code
        generate = folder_class(folder, "pipeline_latent_diffusion", "LatentDiffusionPipeline")
        pipes = {"generate": generate.from_pretrained(str(folder))}
    else:
        pipes = {"generate": DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=remote)}
    if "edit" in caps.tasks:
        for task, (module, class_name) in EDIT_PIPELINES.items():
            pipes[task] = folder_class(folder, module, class_name).from_pipe(pipes["generate"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return {task: pipe.to(device) for task, pipe in pipes.items()}


class Stopped(Exception):
    """Raised at the end of a step when the visitor pressed Stop."""


class StepReport:
    """Feeds Gradio's progress bar from the pipeline's steps and stops the run when its visitor pressed Stop: through
    diffusers' `callback_on_step_end`, or by standing in for `DiffusionPipeline.progress_bar` (iterable form) in
    pipelines without that callback."""

    def __init__(self, progress: gr.Progress, stopped):
        self.progress, self.stopped = progress, stopped

    def step(self, done: int, total: int) -> None:
        if self.stopped():
            raise Stopped
        self.progress((done, total), desc="denoising", unit="steps")

    def callback(self, total: int):
        def on_step(pipe, step: int, timestep, tensors: dict) -> dict:
            self.step(step + 1, total)
            return {}
        return on_step

    def progress_bar(self, iterable=None, total=None):
        items = list(iterable)
        for done, item in enumerate(items, start=1):
            yield item
            self.step(done, len(items))


class Runner:
    """Runs the pipelines for one visitor at a time; each visitor (Gradio session) can stop their own run."""

    def __init__(self, pipes: dict):
        self.pipes = pipes
        # The training noise schedule that every sampler is built from, per pipeline.
        self.scheduler_configs = {task: pipe.scheduler.config for task, pipe in pipes.items()}
        self.saved = {task: type(pipe.scheduler) for task, pipe in pipes.items()}
        self.lock = threading.Lock()
        self.stop_requests: set[str] = set()  # session hashes whose run should end at the next step

    def sampler_choices(self, task: str) -> list:
        """The sampler dropdown's (label, value) pairs, the saved sampler first."""
        config = self.scheduler_configs[task]
        algorithm = self.saved[task].__name__.removesuffix("Scheduler")
        detail = {"flow": f"shift {config.get('shift', 1):g}",
                  "consistency": f"grid of {config.get('original_inference_steps')}"}.get(
            family_of(config), config.get("timestep_spacing", "leading"))
        saved = f"{SAVED} ({algorithm}, {detail})"
        return [(saved, SAVED), *((name, name) for name in samplers_for(config))]

    def stop(self, request: gr.Request) -> None:
        self.stop_requests.add(request.session_hash)

    def __call__(self, task: str, session: str | None, progress: gr.Progress, sampler: str, steps: int,
                 **kwargs) -> list:
        """Images of the `task` pipeline with the named sampler; ValueErrors (bad input) become gr.Error."""
        fitting = samplers_for(self.scheduler_configs[task])
        if sampler != SAVED and sampler not in fitting:
            raise gr.Error(f"sampler: {sampler!r} does not sample this model; choose {SAVED} or one of "
                           f"{', '.join(fitting)}", title="Invalid input")
        pipe, steps = self.pipes[task], int(steps)
        report = StepReport(progress, lambda: session in self.stop_requests)
        with self.lock:
            self.stop_requests.discard(session)
            if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
                kwargs["callback_on_step_end"] = report.callback(steps)
            else:
                pipe.progress_bar = report.progress_bar  # an instance attribute, removed after the run
            # Same training noise schedule, the chosen sampling algorithm (as `ldm sample --scheduler`).
            cls, options = (self.saved[task], {}) if sampler == SAVED else SAMPLERS[sampler]
            pipe.scheduler = cls.from_config(self.scheduler_configs[task], **options)
            progress((0, steps), desc="denoising", unit="steps")
            try:
                return pipe(num_inference_steps=steps, **kwargs).images
            except ValueError as e:  # the pipeline's check of its arguments: show its message in the page
                raise gr.Error(str(e), title="Invalid input", print_exception=False) from e
            finally:
                self.stop_requests.discard(session)
                pipe.__dict__.pop("progress_bar", None)


def seeded_generators(seed, count) -> list[torch.Generator]:
    """Image k is drawn with seed + k on a CPU generator, as in `ldm sample`: the same images on CPU and GPU."""
    if seed is None or int(seed) != seed or not 0 <= seed < 2**63 - MAX_IMAGES:
        raise gr.Error(f"seed: give a whole number from 0 to {2**63 - MAX_IMAGES - 1}, got {seed}", title="Invalid input")
    if count is None or not 1 <= int(count) <= MAX_IMAGES:
        raise gr.Error(f"number of images: give 1 to {MAX_IMAGES}, got {count}", title="Invalid input")
    return [torch.Generator().manual_seed(int(seed) + k) for k in range(int(count))]


def class_label(value, caps: Capabilities):
    """A class name as the dropdown gives it, or an id typed into it (the pipeline checks both)."""
    value = str(value).strip() if value is not None else ""
    if value in caps.class_names:
        return value
    return int(value) if re.fullmatch(r"-?\d+", value) else value


def find_model(here: Path) -> str:
    """Where the model is when this file runs as app.py: $LDM_DEMO_MODEL, else this folder if it holds the model,
    else the first `models:` entry of the Space README beside it."""
    if os.environ.get("LDM_DEMO_MODEL"):
        return os.environ["LDM_DEMO_MODEL"]
    if (here / "model_index.json").is_file():
        return str(here)
    readme = here / "README.md"
    header = re.match(r"---\n(.*?)\n---", readme.read_text(), re.DOTALL) if readme.is_file() else None
    match = re.search(r"^models:\s*\n\s*-\s*(\S+)", header.group(1), re.MULTILINE) if header else None
    if not match:
        raise SystemExit("no model: set LDM_DEMO_MODEL, run beside model_index.json, or name it in README.md models:")
    return match.group(1)
