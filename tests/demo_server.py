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
    """Yield (url, {task: pipeline}) while the demo of `folder` runs; Gradio's uploads and outputs go to temp_dir."""
    os.environ["GRADIO_TEMP_DIR"] = str(temp_dir)
    caps = read_capabilities(folder)
    pipes = task_pipelines(load_pipeline(folder), caps)
    demo: gr.Blocks = build_demo(pipes, caps)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=CSS)
    try:
        yield f"http://127.0.0.1:{port}/", pipes
    finally:
        demo.close()
