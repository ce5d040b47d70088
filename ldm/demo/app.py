"""The web demo of a model folder: a Gradio app whose tabs follow what the model can do.

Run it with `ldm demo --model DIR_OR_HUB_ID`, or as `python app.py` where `ldm push --with_demo` copied this file:
beside the model's own files (a folder or a Hub model repository), or alone in a Hugging Face Space whose README
names the model (`models: [user/name]`). It therefore imports only gradio, torch, diffusers, numpy, PIL and the
standard library; ldm's pipeline code comes from the model folder itself (diffusers' remote code).

Tabs (`Capabilities.tasks`):
  Generate  sampling models: seed, number of images, sampler, steps; a class dropdown and a guidance slider (class
            models) or a prompt, a negative prompt and a guidance slider (text models); a gallery of PNGs.
  Edit      ldm's sampling models whose folder carries the editing pipelines: upload an image; img2img with a
            strength, or inpainting of the pixels painted with the brush (Gradio's ImageEditor); a class for class
            models.
  Upscale   super-resolution models: a low-resolution image in, the model's result beside a bicubic upscale.

One pipeline serves every visitor: runs wait in Gradio's queue and take the pipeline one at a time (a lock, since a
stopped run's thread finishes its current step after Gradio has moved on). The pipeline's step callback feeds the
progress bar (pipelines without the callback: their `progress_bar`) and ends a run at the next step when its visitor
presses Stop. Invalid input is reported in the page
with the pipeline's own message (gr.Error), never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

# The samplers of `ldm sample --scheduler` (ldm/schedulers.py; a test checks that the two agree).
SAMPLERS = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "ddpm": DDPMScheduler,
}
TEXT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
DEFAULT_GUIDANCE = {"class": 2.0, "text": 7.5}  # the pipelines' own defaults (LatentDiffusionPipeline, Stable Diffusion)
MAX_IMAGES = 16  # per click: a CPU Space draws 16 digits in a few seconds


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
    title: str = "Latent diffusion"  # page heading


def read_capabilities(folder: str | os.PathLike) -> Capabilities:
    """Conditioning, class names and tasks of a saved folder (model_index.json, unet/ and vae/config.json)."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    name = index.get("_class_name")
    name = name[1] if isinstance(name, list) else name
    title = f"Latent diffusion: {folder.resolve().name}"
    if name in TEXT_PIPELINES:
        return Capabilities("text", title=title)
    unet, vae = (json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae"))
    if unet["in_channels"] != vae["latent_channels"]:  # the UNet also takes the low-res image: super-resolution
        return Capabilities("none", tasks=("upscale",), title=title)
    edit = all((folder / f"{module}.py").is_file() for module, _ in EDIT_PIPELINES.values())
    tasks = ("generate", "edit") if edit else ("generate",)
    num_embeds = unet.get("num_class_embeds")
    if num_embeds is None:
        return Capabilities("none", tasks=tasks, title=title)
    names = index.get("class_names") or [str(i) for i in range(num_embeds - 1)]  # the last embedding is the null class
    return Capabilities("class", tuple(names), tasks=tasks, title=title)


def load_pipelines(folder: str | os.PathLike, caps: Capabilities, device: str | None = None) -> dict:
    """{task: pipeline} with diffusers alone: ldm's code from the folder (remote code, which is this same
    repository's), stock Stable Diffusion folders without any; the editing pipelines share the weights."""
    from diffusers.utils import get_class_from_dynamic_module

    index = json.loads((Path(folder) / "model_index.json").read_text())
    remote = isinstance(index.get("_class_name"), list)  # ["pipeline_latent_diffusion", "LatentDiffusionPipeline"]
    if "upscale" in caps.tasks:
        cls = get_class_from_dynamic_module(str(folder), f"{SUPERRES_PIPELINE[0]}.py", SUPERRES_PIPELINE[1])
        pipes = {"upscale": cls.from_pretrained(str(folder))}
    else:
        pipes = {"generate": DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=remote)}
    if "edit" in caps.tasks:
        for task, (module, class_name) in EDIT_PIPELINES.items():
            cls = get_class_from_dynamic_module(str(folder), f"{module}.py", class_name)
            pipes[task] = cls.from_pipe(pipes["generate"])
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
        self.lock = threading.Lock()
        self.stop_requests: set[str] = set()  # session hashes whose run should end at the next step

    def stop(self, request: gr.Request) -> None:
        self.stop_requests.add(request.session_hash)

    def __call__(self, task: str, session: str | None, progress: gr.Progress, sampler: str, steps: int,
                 **kwargs) -> list:
        """Images of the `task` pipeline with the named sampler; ValueErrors (bad input) become gr.Error."""
        if sampler not in SAMPLERS:
            raise gr.Error(f"sampler: unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        pipe, steps = self.pipes[task], int(steps)
        report = StepReport(progress, lambda: session in self.stop_requests)
        with self.lock:
            self.stop_requests.discard(session)
            if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
                kwargs["callback_on_step_end"] = report.callback(steps)
            else:
                pipe.progress_bar = report.progress_bar  # an instance attribute, removed after the run
            # Same training noise schedule, the chosen sampling algorithm (as `ldm sample --scheduler`).
            pipe.scheduler = SAMPLERS[sampler].from_config(self.scheduler_configs[task])
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


def generate_fn(runner: Runner, caps: Capabilities):
    """The Generate button's function; its parameters (the API's) depend on the model's conditioning."""

    def run(seed, count, sampler, steps, request, progress, **conditions):
        generators = seeded_generators(seed, count)
        try:
            return runner("generate", request.session_hash if request else None, progress, sampler, steps,
                          generator=generators, **conditions)
        except Stopped:
            return gr.skip()

    if caps.conditioning == "class":
        def generate(seed, count, sampler, steps, class_name, guidance_scale, request: gr.Request,
                     progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
            label = class_label(class_name, caps)
            return run(seed, count, sampler, steps, request, progress, class_labels=[label] * int(count),
                       guidance_scale=guidance_scale)
    elif caps.conditioning == "text":
        def generate(seed, count, sampler, steps, prompt, negative_prompt, guidance_scale, request: gr.Request,
                     progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
            if not (prompt or "").strip():
                raise gr.Error("prompt: describe the image to draw", title="Invalid input")
            negative = [negative_prompt] * int(count) if (negative_prompt or "").strip() else None
            return run(seed, count, sampler, steps, request, progress, prompt=[prompt] * int(count),
                       negative_prompt=negative, guidance_scale=guidance_scale)
    else:
        def generate(seed, count, sampler, steps, request: gr.Request,
                     progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
            return run(seed, count, sampler, steps, request, progress, batch_size=int(count))
    return generate


def generate_tab(runner: Runner, caps: Capabilities) -> None:
    with gr.Tab("Generate", id="generate"), gr.Row():
        with gr.Column():
            conditions = []
            if caps.conditioning == "class":
                conditions.append(gr.Dropdown(list(caps.class_names), value=caps.class_names[0], label="Class",
                                              allow_custom_value=True, elem_id="class-label",
                                              info="pick a class, or type a class name or id"))
            if caps.conditioning == "text":
                conditions.append(gr.Textbox(label="Prompt", elem_id="prompt", placeholder="what to draw"))
                conditions.append(gr.Textbox(label="Negative prompt", elem_id="negative-prompt",
                                             placeholder="what to steer away from (optional)"))
            if caps.conditioning != "none":
                conditions.append(gr.Slider(0, 15, value=DEFAULT_GUIDANCE[caps.conditioning], step=0.1,
                                            label="Guidance scale", info="1: no guidance", elem_id="guidance"))
            with gr.Row():
                seed = gr.Number(0, precision=0, label="Seed", info="image k uses seed + k", elem_id="seed")
                count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images", elem_id="count")
            with gr.Row():
                sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler", elem_id="sampler")
                steps = gr.Slider(1, 200, value=50, step=1, label="Steps", elem_id="steps")
            with gr.Row():
                start = gr.Button("Generate", variant="primary", elem_id="generate-button")
                stop = gr.Button("Stop", variant="stop", elem_id="stop-button")
        gallery = gr.Gallery(label="Images", format="png", columns=4, buttons=["download", "fullscreen"],
                             interactive=False, elem_id="gallery")
    event = start.click(generate_fn(runner, caps), [seed, count, sampler, steps, *conditions], gallery,
                        api_name="generate", concurrency_id="pipeline", concurrency_limit=1)
    stop.click(runner.stop, None, None, cancels=[event], queue=False, api_name="stop")


def model_mode(pipe) -> str:
    """PIL mode of the model's images: uploads are converted to it (never resized: the pipeline says which size)."""
    return "L" if pipe.vae.config.in_channels == 1 else "RGB"


def editor_inputs(value: dict | None, mode: str):
    """(image, mask) from Gradio's ImageEditor: the uploaded background, and white where the brush painted."""
    if not value or value.get("background") is None:
        raise gr.Error("image: upload an image to edit", title="Invalid input")
    background = value["background"]
    mask = Image.new("L", background.size, 0)
    for layer in value.get("layers") or []:
        painted = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        mask = Image.fromarray(np.maximum(np.asarray(mask), painted.astype(np.uint8) * 255))
    return background.convert(mode), mask


def edit_fn(runner: Runner, caps: Capabilities):
    """The Edit button's function: img2img with the strength, or inpainting of the painted pixels."""
    mode = model_mode(runner.pipes["img2img"])

    def run(editor, task, strength, seed, sampler, steps, request, progress, **conditions):
        image, mask = editor_inputs(editor, mode)
        args = ({"image": [image], "mask_image": [mask]} if task == "inpaint" else
                {"image": [image], "strength": strength})
        try:
            return runner(task, request.session_hash if request else None, progress, sampler, steps,
                          generator=seeded_generators(seed, 1), **args, **conditions)[0]
        except Stopped:
            return gr.skip()

    if caps.conditioning == "class":
        def edit(editor, task, strength, seed, sampler, steps, class_name, guidance_scale, request: gr.Request,
                 progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
            return run(editor, task, strength, seed, sampler, steps, request, progress,
                       class_labels=[class_label(class_name, caps)], guidance_scale=guidance_scale)
    else:
        def edit(editor, task, strength, seed, sampler, steps, request: gr.Request,
                 progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
            return run(editor, task, strength, seed, sampler, steps, request, progress)
    return edit


def sampling_controls(prefix: str, steps: int = 50):
    with gr.Row():
        seed = gr.Number(0, precision=0, label="Seed", elem_id=f"{prefix}seed")
        sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler", elem_id=f"{prefix}sampler")
        steps = gr.Slider(1, 200, value=steps, step=1, label="Steps", elem_id=f"{prefix}steps")
    return seed, sampler, steps


def edit_tab(runner: Runner, caps: Capabilities) -> None:
    with gr.Tab("Edit", id="edit"), gr.Row():
        with gr.Column():
            editor = gr.ImageEditor(label="Image (paint over what to inpaint)", type="pil", format="png",
                                    sources=("upload", "clipboard"), transforms=(), layers=False,
                                    brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"), elem_id="edit-image")
            task = gr.Radio(["img2img", "inpaint"], value="img2img", label="Task", elem_id="edit-task",
                            info="img2img re-draws the whole image; inpaint fills the painted pixels, keeps the rest")
            strength = gr.Slider(0, 1, value=0.6, step=0.05, label="Strength (img2img)", elem_id="strength",
                                 info="0 keeps the image, 1 ignores it")
            conditions = []
            if caps.conditioning == "class":
                conditions = [gr.Dropdown(list(caps.class_names), value=caps.class_names[0], label="Class",
                                          allow_custom_value=True, elem_id="edit-class"),
                              gr.Slider(0, 15, value=DEFAULT_GUIDANCE["class"], step=0.1, label="Guidance scale",
                                        elem_id="edit-guidance")]
            seed, sampler, steps = sampling_controls("edit-")
            with gr.Row():
                start = gr.Button("Edit", variant="primary", elem_id="edit-button")
                stop = gr.Button("Stop", variant="stop", elem_id="edit-stop")
        result = gr.Image(label="Result", type="pil", format="png", interactive=False, elem_id="edit-result")
    event = start.click(edit_fn(runner, caps), [editor, task, strength, seed, sampler, steps, *conditions], result,
                        api_name="edit", concurrency_id="pipeline", concurrency_limit=1)
    stop.click(runner.stop, None, None, cancels=[event], queue=False, api_name=False)


def upscale_tab(runner: Runner) -> None:
    mode = model_mode(runner.pipes["upscale"])

    def upscale(image, seed, sampler, steps, request: gr.Request,
                progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        if image is None:
            raise gr.Error("image: upload a low-resolution image", title="Invalid input")
        low = image.convert(mode)
        try:
            high = runner("upscale", request.session_hash if request else None, progress, sampler, steps,
                          image=[low], generator=seeded_generators(seed, 1))[0]
        except Stopped:
            return gr.skip(), gr.skip()
        return low.resize(high.size, Image.BICUBIC), high

    with gr.Tab("Upscale", id="upscale"):
        with gr.Row():
            image = gr.Image(label="Low-resolution image", type="pil", image_mode=None, format="png",
                             sources=("upload", "clipboard"), elem_id="upscale-image")
            bicubic = gr.Image(label="Bicubic", type="pil", format="png", interactive=False, elem_id="upscale-bicubic")
            high = gr.Image(label="Latent diffusion", type="pil", format="png", interactive=False,
                            elem_id="upscale-result")
        seed, sampler, steps = sampling_controls("upscale-")
        with gr.Row():
            start = gr.Button("Upscale", variant="primary", elem_id="upscale-button")
            stop = gr.Button("Stop", variant="stop", elem_id="upscale-stop")
    event = start.click(upscale, [image, seed, sampler, steps], [bicubic, high], api_name="upscale",
                        concurrency_id="pipeline", concurrency_limit=1)
    stop.click(runner.stop, None, None, cancels=[event], queue=False, api_name=False)


def build_demo(pipes: dict, caps: Capabilities) -> gr.Blocks:
    """The page: one tab per task the model supports (`caps.tasks`); `pipes` maps tasks to pipelines (the Edit tab
    uses "img2img" and "inpaint")."""
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    runner = Runner(pipes)
    what = {"none": "unconditional", "class": f"class-conditional ({len(caps.class_names)} classes)",
            "text": "text-to-image"}[caps.conditioning]
    what = "super-resolution" if "upscale" in caps.tasks else what
    with gr.Blocks(title=caps.title) as demo:
        gr.Markdown(f"# {caps.title}\nA {what} latent diffusion model.")
        if "generate" in caps.tasks:
            generate_tab(runner, caps)
        if "edit" in caps.tasks:
            edit_tab(runner, caps)
        if "upscale" in caps.tasks:
            upscale_tab(runner)
    demo.queue(max_size=64)
    return demo


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


def main() -> None:
    """`python app.py [--model DIR_OR_HUB_ID] [--port N] [--share]`: a Space runs it with no arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: see find_model)")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--share", action="store_true", help="also serve on a public gradio.live link")
    args = parser.parse_args()
    model = args.model or find_model(Path(__file__).resolve().parent)
    if not Path(model).is_dir():
        from huggingface_hub import snapshot_download

        model = snapshot_download(model)
    caps = read_capabilities(model)
    build_demo(load_pipelines(model, caps), caps).launch(server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
