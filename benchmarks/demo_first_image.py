"""How long a visitor of `ldm demo` waits: from the command to a page that answers, and from the Generate click
(the page's defaults: 4 images, the saved sampler, 50 steps) to the first image shown, beside the same pipeline call made directly
in one process (the reference).

    python benchmarks/demo_first_image.py --model runs/digits/pipeline [--threads 1]

Needs the browser extra and a Chromium (see tests/test_demo_browser.py). Prints seconds and the ratio to the direct call.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time


def wait_for_port(port: int, app: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise SystemExit(f"ldm demo exited:\n{app.stdout.read()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"ldm demo did not listen within {timeout} s")


def direct_call(model: str, threads: int) -> float:
    """Seconds for the pipeline call the page's defaults make, in this process, after loading."""
    import torch

    from ldm.pipelines.loading import load_pipeline

    torch.set_num_threads(threads)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    pipe(batch_size=4, num_inference_steps=50, generator=[torch.Generator().manual_seed(k) for k in range(4)])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an unconditional or class model folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the demo and of the direct call")
    p.add_argument("--chromium", default=shutil.which("chromium"), help="Chromium binary")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GRADIO_ANALYTICS_ENABLED": "False"}
    start = time.perf_counter()
    app = subprocess.Popen([sys.executable, "-m", "ldm.cli", "demo", "--model", args.model, "--port", str(port),
                            "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, app)
        ready = time.perf_counter() - start
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page()
            page.set_default_timeout(600_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#generate-button").wait_for()
            loaded = time.perf_counter() - start
            click = time.perf_counter()
            page.locator("#generate-button").click()
            page.locator("#gallery img").first.wait_for()
            first_image = time.perf_counter() - click
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=30)
    direct = direct_call(args.model, args.threads)
    print(f"threads {args.threads}; model {args.model}")
    print(f"ldm demo command -> port open        {ready:7.1f} s")
    print(f"ldm demo command -> page loaded      {loaded:7.1f} s")
    print(f"Generate click -> first image shown  {first_image:7.1f} s   (4 images, the saved sampler, 50 steps)")
    print(f"the same pipeline call, direct       {direct:7.1f} s   ratio demo/direct {first_image / direct:.2f}")


if __name__ == "__main__":
    main()
