"""The demo travels with the model: `ldm push --with_demo` adds app.py, requirements.txt and a Demo section to the
model repository and creates a Gradio Space for it; that Space's app runs where ldm cannot be imported, downloads the
model, and serves the pipeline's images."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hub_stand_in import HubStandIn
from test_class_conditioning import BLOCK_LDM, class_pipeline
from test_hub import REPO, hub_env

from ldm.config import load_config
from ldm.demo.space import APP, APP_FILES, write_demo_files
from ldm.model_card import write_model_card

pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed (the browser extra)")

from demo_server import free_port
from test_demo import reference, shown

# Run a Space's app.py as the Space does (`python app.py`), in a process that cannot import ldm.
RUN_APP = BLOCK_LDM + textwrap.dedent(
    """
    import os, runpy, torch
    torch.set_num_threads(1)
    sys.argv = ["app.py", "--port", sys.argv[1]]
    sys.path.insert(0, os.getcwd())  # as `python app.py` puts the script's folder first
    runpy.run_path("app.py", run_name="__main__")
    """
)


def saved_model(tmp_path):
    folder = tmp_path / "pipeline"
    class_pipeline().save_pretrained(folder)  # classes cat, dog, fox
    write_model_card(folder, load_config(REPO / "configs/tiny.yaml", {"output_dir": str(tmp_path / "run")}),
                     repo_hint="me/tiny-ldm")
    return folder


def test_demo_files_in_the_folder(tmp_path):
    folder = saved_model(tmp_path)
    write_demo_files(folder, "me/tiny-ldm-demo")
    write_demo_files(folder, "me/other-space")  # a second push replaces the section, keeping the rest
    card = (folder / "README.md").read_text()
    assert card.count("## Demo") == 1 and "https://huggingface.co/spaces/me/other-space" in card
    assert "me/tiny-ldm-demo" not in card and card.index("## Use") < card.index("## Demo")
    for name in APP_FILES:
        assert (folder / name).read_bytes() == APP.with_name(name).read_bytes()
    requirements = (folder / "requirements.txt").read_text().split()
    assert requirements[0] == "torch" and any(r.startswith("diffusers>=") for r in requirements)
    assert not any(r.startswith(("ldm", "transformers")) for r in requirements)  # no text encoder in a class model
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        write_demo_files(tmp_path)


@pytest.mark.slow
def test_pushed_space_serves_the_model_without_ldm(tmp_path):
    folder = saved_model(tmp_path)
    with HubStandIn() as hub:
        env = hub_env(hub.url, tmp_path / "hf_home")
        pushed = subprocess.run([sys.executable, "-m", "ldm.cli", "push", "--model", str(folder), "--repo_id",
                                 "me/tiny-ldm", "--with_demo"], capture_output=True, text=True, env=env, timeout=120,
                                check=False)
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        model, space = hub.state.repos["me/tiny-ldm"], hub.state.repos["spaces/me/tiny-ldm-demo"]
        assert model["app.py"] == APP.read_bytes() and "requirements.txt" in model
        assert "[me/tiny-ldm-demo](https://huggingface.co/spaces/me/tiny-ldm-demo)" in model["README.md"].decode()
        assert set(space) == {"README.md", "app.py", "serving.py", "requirements.txt"}
        assert model["serving.py"] == APP.with_name("serving.py").read_bytes()
        space_card = space["README.md"].decode()
        assert "\nsdk: gradio\n" in space_card and "\nmodels:\n- me/tiny-ldm\n" in space_card

        # The Space: its three files in a folder, the model downloaded from the Hub by the name in its card.
        space_dir = tmp_path / "space"
        space_dir.mkdir()
        for name, content in space.items():
            (space_dir / name).write_bytes(content)
        port = free_port()
        app = subprocess.Popen([sys.executable, "-I", "-c", RUN_APP, str(port)], cwd=space_dir,
                               env={**env, "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        try:
            client = connect(port, app, tmp_path)
            got = shown(client.predict(5, 2, "ddim", 3, "fox", 2.5, api_name="/generate"))
        finally:
            app.terminate()
            log = app.communicate(timeout=30)[0]
    want = reference(folder, "ddim", 5, 2, class_labels=["fox"] * 2, guidance_scale=2.5)
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    assert "diffusers_modules" in os.listdir(tmp_path / "hf_home" / "modules"), log[-3000:]  # ldm's code came from the repo


def connect(port: int, app, tmp_path, timeout: float = 180):
    """A client of the app once it listens (it loads torch, diffusers and the model first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise AssertionError(f"the app exited:\n{app.stdout.read()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:  # not listening yet
            time.sleep(1)
            continue
        return gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False,
                                    download_files=str(tmp_path / "downloads"))
    raise AssertionError(f"the app did not answer within {timeout} s")


def test_the_app_finds_its_model(tmp_path, monkeypatch):
    from ldm.demo.serving import find_model

    monkeypatch.delenv("LDM_DEMO_MODEL", raising=False)
    (tmp_path / "README.md").write_text("---\ntitle: x\nsdk: gradio\nmodels:\n- me/tiny-ldm\n---\n\nA Space.\n")
    assert find_model(tmp_path) == "me/tiny-ldm"  # a Space: the model its card names
    (tmp_path / "model_index.json").write_text("{}")
    assert find_model(tmp_path) == str(tmp_path)  # beside the model's files
    monkeypatch.setenv("LDM_DEMO_MODEL", "other/model")
    assert find_model(tmp_path) == "other/model"
    monkeypatch.delenv("LDM_DEMO_MODEL")
    (tmp_path / "model_index.json").unlink()
    (tmp_path / "README.md").write_text("# no front matter\n")
    with pytest.raises(SystemExit, match="LDM_DEMO_MODEL"):
        find_model(tmp_path)
