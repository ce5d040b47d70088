"""Shared by the demo tests: serve a model folder's demo in this process, on a free local port."""

from __future__ import annotations

import contextlib
import os
import socket

import gradio as gr

from ldm.cli.demo import task_pipelines
from ldm.demo.app import CSS, build_demo
from ldm.demo.serving import read_capabilities
from ldm.pipelines.loading import load_pipeline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(folder, temp_dir):
    """Yield (url, {task: pipeline}) while the demo of `folder` runs; Gradio's uploads and outputs go to temp_dir.

    Gradio reads GRADIO_TEMP_DIR when it builds the page and launches, and again on every request (a file sent
    with an event must lie in it); it is this server's folder while the server runs and is restored afterwards,
    so that an enclosing server (a module's fixture) gets its own back and no later test writes into this one's."""
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(temp_dir)
    try:
        caps = read_capabilities(folder)
        pipes = task_pipelines(load_pipeline(folder), caps)
        demo: gr.Blocks = build_demo(pipes, caps)
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=CSS)
        try:
            yield f"http://127.0.0.1:{port}/", pipes
        finally:
            demo.close()
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
