"""The web demo of a model folder: a Gradio app whose tabs follow what the model can do.

Run it with `ldm demo --model DIR_OR_HUB_ID`, or as `python app.py` where `ldm push --with_demo` copied this file:
beside the model's own files (a folder or a Hub model repository), or alone in a Hugging Face Space whose README
names the model (`models: [user/name]`). It therefore imports only gradio, torch, diffusers, numpy, PIL and the
standard library; ldm's pipeline code comes from the model folder itself (diffusers' remote code).

Tabs:
  Generate  every model: seed, number of images, sampler, steps; a class dropdown and a guidance slider (class
            models) or a prompt, a negative prompt and a guidance slider (text models); a gallery of PNGs.

One pipeline serves every visitor: runs wait in Gradio's queue and take the pipeline one at a time (a lock, since a
stopped run's thread finishes its current step after Gradio has moved on). The pipeline's step callback feeds the
progress bar and ends a run at the next step when its visitor presses Stop. Invalid input is reported in the page
with the pipeline's own message (gr.Error), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

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


@dataclass(frozen=True)
class Capabilities:
    """What a model folder can do, read from its JSON files before any weights are loaded."""

    conditioning: str  # "none", "class" or "text"
    class_names: tuple[str, ...] = ()  # class models: a name per class id ("0", "1", ... if the folder names none)
    title: str = "Latent diffusion"  # page heading
    tasks: tuple[str, ...] = field(default=("generate",))  # the tabs to show


def read_capabilities(folder: str | os.PathLike) -> Capabilities:
    """Conditioning and class names of a saved folder (model_index.json, unet/config.json)."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    name = index.get("_class_name")
    name = name[1] if isinstance(name, list) else name
    title = f"Latent diffusion: {folder.resolve().name}"
    if name in TEXT_PIPELINES:
        return Capabilities("text", title=title)
    unet_config = folder / "unet" / "config.json"
    num_embeds = json.loads(unet_config.read_text()).get("num_class_embeds") if unet_config.is_file() else None
    if num_embeds is None:
        return Capabilities("none", title=title)
    names = index.get("class_names") or [str(i) for i in range(num_embeds - 1)]  # the last embedding is the null class
    return Capabilities("class", tuple(names), title=title)


def load_pipeline(folder: str | os.PathLike, device: str | None = None) -> DiffusionPipeline:
    """The folder's pipeline with diffusers alone: ldm's code from the folder (remote code, which is this same
    repository's), stock Stable Diffusion folders without any."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    remote = isinstance(index.get("_class_name"), list)  # ["pipeline_latent_diffusion", "LatentDiffusionPipeline"]
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=remote)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class Stopped(Exception):
    """Raised from the step callback when the visitor pressed Stop."""


class Runner:
    """Runs the pipeline for one visitor at a time; each visitor (Gradio session) can stop their own run."""

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe
        self.scheduler_config = pipe.scheduler.config  # the training noise schedule every sampler is built from
        self.lock = threading.Lock()
        self.stop_requests: set[str] = set()  # session hashes whose run should end at the next step

    def stop(self, request: gr.Request) -> None:
        self.stop_requests.add(request.session_hash)

    def __call__(self, session: str | None, progress: gr.Progress, sampler: str, steps: int, **kwargs) -> list:
        """Images of `self.pipe(**kwargs)` with the named sampler; ValueErrors (bad input) become gr.Error."""
        if sampler not in SAMPLERS:
            raise gr.Error(f"sampler: unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        steps = int(steps)

        def on_step(pipe, step: int, timestep, tensors: dict) -> dict:
            if session in self.stop_requests:
                raise Stopped
            progress((step + 1, steps), desc="denoising", unit="steps")
            return {}

        with self.lock:
            self.stop_requests.discard(session)
            # Same training noise schedule, the chosen sampling algorithm (as `ldm sample --scheduler`).
            self.pipe.scheduler = SAMPLERS[sampler].from_config(self.scheduler_config)
            progress((0, steps), desc="denoising", unit="steps")
            try:
                return self.pipe(num_inference_steps=steps, callback_on_step_end=on_step, **kwargs).images
            except ValueError as e:  # the pipeline's check of its arguments: show its message in the page
                raise gr.Error(str(e), title="Invalid input", print_exception=False) from e
            finally:
                self.stop_requests.discard(session)


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
            return runner(request.session_hash if request else None, progress, sampler, steps,
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


def build_demo(pipe: DiffusionPipeline, caps: Capabilities) -> gr.Blocks:
    """The page: one tab per task the model supports (`caps.tasks`)."""
    pipe.set_progress_bar_config(disable=True)
    runner = Runner(pipe)
    what = {"none": "unconditional", "class": f"class-conditional ({len(caps.class_names)} classes)",
            "text": "text-to-image"}[caps.conditioning]
    with gr.Blocks(title=caps.title) as demo:
        gr.Markdown(f"# {caps.title}\nA {what} latent diffusion model.")
        generate_tab(runner, caps)
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
    demo = build_demo(load_pipeline(model), read_capabilities(model))
    demo.launch(server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
