"""`ldm demo`: serve a saved model (a folder or a Hub id) as a Gradio web page (ldm/demo/app.py)."""

from __future__ import annotations

import argparse
import os

from ldm.cli.common import CLIError


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="serve a saved model as a web page (Gradio; needs the demo extra)",
        description="Launch a Gradio app for a saved model, with a tab per task it can do: Generate (seed, number of "
        "images, sampler, steps, class or prompt and guidance), Edit (img2img, inpainting with a painted mask) and "
        "Upscale (super-resolution models), with progress, a Stop button and a queue. Needs `pip install -e "
        "'.[demo]'`.",
    )
    p.add_argument("--model", required=True, help="folder written by training (save_pretrained), or a Hub model id")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--share", action="store_true", help="also serve on a temporary public gradio.live link")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=demo)


def model_folder(model: str) -> str:
    """A local folder with model_index.json: `model` itself, or the Hub snapshot of the id `model`."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise CLIError(f"--model {model!r} has no model_index.json; expected a folder written by save_pretrained")
        return model
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise CLIError(f"--model {model!r} is neither a folder nor a Hub id (user-or-org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(model)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise CLIError(f"--model {model!r} is not a folder, and downloading it from the Hub failed: {e}") from e


def demo(args: argparse.Namespace) -> int:
    """Check the model and the extra, load the pipeline with ldm's loader, build the page, serve it."""
    folder = model_folder(args.model)
    try:
        from ldm.demo.app import CSS, build_demo
        from ldm.demo.serving import read_capabilities
    except ImportError as e:
        raise CLIError(f"ldm demo needs Gradio: pip install -e '.[demo]' ({e})") from e
    import torch

    from ldm.pipelines.loading import load_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device")
    try:
        caps = read_capabilities(folder, None if os.path.isdir(args.model) else args.model)
        pipes = task_pipelines(load_pipeline(folder).to(device), caps)
    except (OSError, ValueError, KeyError) as e:  # missing/corrupt weights or configs
        raise CLIError(f"cannot load a pipeline from {args.model!r}: {e}") from e
    build_demo(pipes, caps).launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS)
    return 0


def task_pipelines(pipe, caps) -> dict:
    """{task: pipeline} for the demo's tabs, with ldm's classes; the editing pipelines share `pipe`'s weights."""
    if "upscale" in caps.tasks:
        return {"upscale": pipe}
    pipes = {"generate": pipe}
    if "edit" in caps.tasks:
        from ldm.pipelines import LatentImg2ImgPipeline, LatentInpaintPipeline

        pipes.update(img2img=LatentImg2ImgPipeline.from_pipe(pipe), inpaint=LatentInpaintPipeline.from_pipe(pipe))
    return pipes
