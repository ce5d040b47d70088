"""The web demo of a model folder: a Gradio app whose tabs follow what the model can do.

Run it with `ldm demo --model DIR_OR_HUB_ID`, or as `python app.py` where `ldm push --with_demo` copied this file:
beside the model's own files (a folder or a Hub model repository), or alone in a Hugging Face Space whose README
names the model (`models: [user/name]`). It therefore imports only gradio, torch, diffusers, numpy, PIL, the
standard library and its sibling serving.py (copied with it); ldm's pipeline code comes from the model folder itself
(diffusers' remote code).

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
presses Stop. Invalid input is reported in the page with the pipeline's own message (gr.Error), never a traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

if __package__:  # in the package: `ldm demo`
    from . import serving
else:  # `python app.py` beside serving.py: a model repository or a Space
    import serving


def generate_fn(runner: serving.Runner, caps: serving.Capabilities):
    """The Generate button's function; its parameters (the API's) depend on the model's conditioning."""

    def run(seed, count, sampler, steps, request, progress, **conditions):
        generators = serving.seeded_generators(seed, count)
        try:
            return runner("generate", request.session_hash if request else None, progress, sampler, steps,
                          generator=generators, **conditions)
        except serving.Stopped:
            return gr.skip()

    if caps.conditioning == "class":
        def generate(seed, count, sampler, steps, class_name, guidance_scale, request: gr.Request,
                     progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
            label = serving.class_label(class_name, caps)
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


def generate_tab(runner: serving.Runner, caps: serving.Capabilities) -> None:
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
                conditions.append(gr.Slider(0, 15, value=caps.guidance_scale, step=0.1,
                                            label="Guidance scale", info="1: no guidance", elem_id="guidance"))
            with gr.Row():
                seed = gr.Number(0, precision=0, label="Seed", info="image k uses seed + k", elem_id="seed")
                count = gr.Slider(1, serving.MAX_IMAGES, value=4, step=1, label="Images", elem_id="count")
            with gr.Row():
                sampler = gr.Dropdown(runner.sampler_choices("generate"), value=serving.SAVED, label="Sampler",
                                      elem_id="sampler")
                steps = gr.Slider(1, 200, value=caps.steps, step=1, label="Steps", elem_id="steps",
                                  info=f"the model's own: {caps.steps}")
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


def edit_fn(runner: serving.Runner, caps: serving.Capabilities):
    """The Edit button's function: img2img with the strength, or inpainting of the painted pixels."""
    mode = model_mode(runner.pipes["img2img"])

    def run(editor, task, strength, seed, sampler, steps, request, progress, **conditions):
        image, mask = editor_inputs(editor, mode)
        args = ({"image": [image], "mask_image": [mask]} if task == "inpaint" else
                {"image": [image], "strength": strength})
        try:
            return runner(task, request.session_hash if request else None, progress, sampler, steps,
                          generator=serving.seeded_generators(seed, 1), **args, **conditions)[0]
        except serving.Stopped:
            return gr.skip()

    if caps.conditioning == "class":
        def edit(editor, task, strength, seed, sampler, steps, class_name, guidance_scale, request: gr.Request,
                 progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
            return run(editor, task, strength, seed, sampler, steps, request, progress,
                       class_labels=[serving.class_label(class_name, caps)], guidance_scale=guidance_scale)
    else:
        def edit(editor, task, strength, seed, sampler, steps, request: gr.Request,
                 progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
            return run(editor, task, strength, seed, sampler, steps, request, progress)
    return edit


def sampling_controls(runner: serving.Runner, task: str, prefix: str, steps: int = 50):
    with gr.Row():
        seed = gr.Number(0, precision=0, label="Seed", elem_id=f"{prefix}seed")
        sampler = gr.Dropdown(runner.sampler_choices(task), value=serving.SAVED, label="Sampler", elem_id=f"{prefix}sampler")
        steps = gr.Slider(1, 200, value=steps, step=1, label="Steps", elem_id=f"{prefix}steps")
    return seed, sampler, steps


def edit_tab(runner: serving.Runner, caps: serving.Capabilities) -> None:
    # Brush and eraser an eighth of the image wide (Gradio's "auto" size follows its canvas, not the image).
    width = max(1, min(runner.pipes["inpaint"].image_size()) // 8)
    with gr.Tab("Edit", id="edit"), gr.Row():
        with gr.Column():
            editor = gr.ImageEditor(label="Image (paint over what to inpaint)", type="pil", format="png",
                                    sources=("upload", "clipboard"), transforms=(), layers=False,
                                    brush=gr.Brush(default_size=width, colors=["#ff00ff"], color_mode="fixed"),
                                    eraser=gr.Eraser(default_size=width), elem_id="edit-image")
            task = gr.Radio(["img2img", "inpaint"], value="img2img", label="Task", elem_id="edit-task",
                            info="img2img re-draws the whole image; inpaint fills the painted pixels, keeps the rest")
            strength = gr.Slider(0, 1, value=0.6, step=0.05, label="Strength (img2img)", elem_id="strength",
                                 info="0 keeps the image, 1 ignores it")
            conditions = []
            if caps.conditioning == "class":
                conditions = [gr.Dropdown(list(caps.class_names), value=caps.class_names[0], label="Class",
                                          allow_custom_value=True, elem_id="edit-class"),
                              gr.Slider(0, 15, value=caps.guidance_scale, step=0.1, label="Guidance scale",
                                        elem_id="edit-guidance")]
            seed, sampler, steps = sampling_controls(runner, "inpaint", "edit-")
            with gr.Row():
                start = gr.Button("Edit", variant="primary", elem_id="edit-button")
                stop = gr.Button("Stop", variant="stop", elem_id="edit-stop")
        result = gr.Image(label="Result", type="pil", format="png", interactive=False, height=360,
                          elem_id="edit-result")
    event = start.click(edit_fn(runner, caps), [editor, task, strength, seed, sampler, steps, *conditions], result,
                        api_name="edit", concurrency_id="pipeline", concurrency_limit=1)
    stop.click(runner.stop, None, None, cancels=[event], queue=False, api_name=False)


def upscale_tab(runner: serving.Runner) -> None:
    mode = model_mode(runner.pipes["upscale"])

    def upscale(image, seed, sampler, steps, request: gr.Request,
                progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        if image is None:
            raise gr.Error("image: upload a low-resolution image", title="Invalid input")
        low = image.convert(mode)
        try:
            high = runner("upscale", request.session_hash if request else None, progress, sampler, steps,
                          image=[low], generator=serving.seeded_generators(seed, 1))[0]
        except serving.Stopped:
            return gr.skip(), gr.skip()
        return low.resize(high.size, Image.BICUBIC), high

    with gr.Tab("Upscale", id="upscale"):
        with gr.Row():
            image = gr.Image(label="Low-resolution image", type="pil", image_mode=None, format="png", height=280,
                             sources=("upload", "clipboard"), elem_id="upscale-image")
            bicubic = gr.Image(label="Bicubic", type="pil", format="png", interactive=False, height=280,
                               elem_id="upscale-bicubic")
            high = gr.Image(label="Latent diffusion", type="pil", format="png", interactive=False, height=280,
                            elem_id="upscale-result")
        seed, sampler, steps = sampling_controls(runner, "upscale", "upscale-")
        with gr.Row():
            start = gr.Button("Upscale", variant="primary", elem_id="upscale-button")
            stop = gr.Button("Stop", variant="stop", elem_id="upscale-stop")
    event = start.click(upscale, [image, seed, sampler, steps], [bicubic, high], api_name="upscale",
                        concurrency_id="pipeline", concurrency_limit=1)
    stop.click(runner.stop, None, None, cancels=[event], queue=False, api_name=False)


# Small images (the digits are 32 px) fill their boxes, with visible pixels rather than blur; pass to launch(css=).
CSS = """
#edit-result img, #upscale-image img, #upscale-bicubic img, #upscale-result img, #gallery img {
  width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
"""


def build_demo(pipes: dict, caps: serving.Capabilities) -> gr.Blocks:
    """The page: one tab per task the model supports (`caps.tasks`); `pipes` maps tasks to pipelines (the Edit tab
    uses "img2img" and "inpaint")."""
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    runner = serving.Runner(pipes)
    what = {"none": "An unconditional", "class": f"A class-conditional ({len(caps.class_names)} classes)",
            "text": "A text-to-image"}[caps.conditioning]
    what = "A super-resolution" if "upscale" in caps.tasks else what
    with gr.Blocks(title=caps.title) as demo:
        gr.Markdown(f"# {caps.title}\n{what} latent diffusion model.")
        if "generate" in caps.tasks:
            generate_tab(runner, caps)
        if "edit" in caps.tasks:
            edit_tab(runner, caps)
        if "upscale" in caps.tasks:
            upscale_tab(runner)
    demo.queue(max_size=64)
    return demo


def main() -> None:
    """`python app.py [--model DIR_OR_HUB_ID] [--port N] [--share]`: a Space runs it with no arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: see serving.find_model)")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--share", action="store_true", help="also serve on a public gradio.live link")
    args = parser.parse_args()
    name = model = args.model or serving.find_model(Path(__file__).resolve().parent)
    if not Path(model).is_dir():  # a Hub id: download it, and title the page with it
        from huggingface_hub import snapshot_download

        model = snapshot_download(name)
    caps = serving.read_capabilities(model, None if model == name else name)
    build_demo(serving.load_pipelines(model, caps), caps).launch(server_port=args.port, share=args.share, css=CSS)


if __name__ == "__main__":
    main()
