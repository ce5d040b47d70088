"""`ldm demo`'s app through its HTTP API (gradio_client), and its runner: the images are the pipeline's for the seed,
sampler and condition asked for; bad input comes back as the pipeline's message; progress, Stop and the queue."""

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed (the browser extra)")

from demo_server import serve
from test_cli_conditional import save_tiny_models

from ldm.demo.serving import SAMPLERS, Runner, Stopped, read_capabilities
from ldm.pipelines.loading import folder_conditioning, load_pipeline
from ldm.schedulers import SCHEDULER_OPTIONS, SCHEDULERS, make_scheduler

STEPS = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def reference(folder, sampler: str, seed: int, count: int, steps: int = STEPS, **conditions) -> list[np.ndarray]:
    """What `ldm sample` draws: a fresh pipeline, the sampler built from the saved schedule, image k from seed + k."""
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    if sampler != "saved":
        pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    generator = [torch.Generator().manual_seed(seed + k) for k in range(count)]
    images = pipe(generator=generator, num_inference_steps=steps, **conditions).images
    return [np.asarray(image) for image in images]


def shown(result) -> list[np.ndarray]:
    """The gallery's PNG files as the client downloaded them."""
    return [np.asarray(Image.open(item["image"])) for item in result]


def test_capabilities_and_samplers_agree_with_ldm(folders):
    for kind in ("class", "none", "text"):
        caps = read_capabilities(folders / kind)
        conditioning, names, _ = folder_conditioning(folders / kind)
        assert caps.conditioning == conditioning == kind
        assert caps.class_names == tuple(names or ())
    assert SAMPLERS == {name: (cls, SCHEDULER_OPTIONS.get(name, {})) for name, cls in SCHEDULERS.items()}


@pytest.fixture(scope="module")
def class_app(folders, tmp_path_factory):
    with serve(folders / "class", tmp_path_factory.mktemp("gradio")) as (url, pipe):
        yield url, pipe


def client(url, tmp_path):
    return gradio_client.Client(url, verbose=False, download_files=str(tmp_path))


def test_class_model_api_draws_the_pipelines_images(class_app, folders, tmp_path):
    url, _ = class_app
    c = client(url, tmp_path)
    api = c.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in api] == ["seed", "count", "sampler", "steps", "class_name", "guidance_scale"]
    for sampler in ("saved", "dpm++sde"):
        got = shown(c.predict(5, 2, sampler, STEPS, "fox", 2.5, api_name="/generate"))
        want = reference(folders / "class", sampler, 5, 2, class_labels=["fox"] * 2, guidance_scale=2.5)
        assert len(got) == 2 and got[0].shape == (16, 16)
        np.testing.assert_array_equal(np.stack(got), np.stack(want))
    # A typed class id reaches the pipeline as an id: "2" is fox.
    np.testing.assert_array_equal(np.stack(shown(c.predict(5, 2, "dpm++sde", STEPS, "2", 2.5, api_name="/generate"))),
                                  np.stack(got))


def test_bad_input_shows_the_pipelines_message(class_app, tmp_path):
    c = client(class_app[0], tmp_path)
    with pytest.raises(gradio_client.exceptions.AppError, match=r"unknown class name 'zebra'; this model knows ints"):
        c.predict(0, 1, "ddim", STEPS, "zebra", 2.0, api_name="/generate")
    with pytest.raises(gradio_client.exceptions.AppError, match=r"class_labels: 3 .* out of range"):
        c.predict(0, 1, "ddim", STEPS, "3", 2.0, api_name="/generate")
    with pytest.raises(gradio_client.exceptions.AppError, match=r"seed: give a whole number"):
        c.predict(-1, 1, "ddim", STEPS, "cat", 2.0, api_name="/generate")


def test_text_and_unconditional_models_api(folders, tmp_path):
    with serve(folders / "text", tmp_path / "gradio_text") as (url, _):
        c = client(url, tmp_path)
        got = shown(c.predict(3, 2, "ddim", STEPS, "a cat", "a dog", 2.0, api_name="/generate"))
        want = reference(folders / "text", "ddim", 3, 2, prompt=["a cat"] * 2, negative_prompt=["a dog"] * 2,
                         guidance_scale=2.0)
        np.testing.assert_array_equal(np.stack(got), np.stack(want))
        with pytest.raises(gradio_client.exceptions.AppError, match="prompt: describe the image"):
            c.predict(3, 1, "ddim", STEPS, "  ", "", 2.0, api_name="/generate")
    with serve(folders / "none", tmp_path / "gradio_none") as (url, _):
        got = shown(client(url, tmp_path).predict(11, 3, "unipc", STEPS, api_name="/generate"))
        np.testing.assert_array_equal(np.stack(got), np.stack(reference(folders / "none", "unipc", 11, 3,
                                                                        batch_size=3)))


def test_two_visitors_at_once_each_get_their_own_images(class_app, folders, tmp_path):
    url, _ = class_app
    jobs = [client(url, tmp_path / str(i)).submit(seed, 2, sampler, STEPS, label, 2.0, api_name="/generate")
            for i, (seed, sampler, label) in enumerate([(1, "ddim", "cat"), (2, "euler", "dog")])]
    results = [shown(job.result(timeout=120)) for job in jobs]
    np.testing.assert_array_equal(np.stack(results[0]), np.stack(reference(folders / "class", "ddim", 1, 2,
                                                                           class_labels=["cat"] * 2,
                                                                           guidance_scale=2.0)))
    np.testing.assert_array_equal(np.stack(results[1]), np.stack(reference(folders / "class", "euler", 2, 2,
                                                                           class_labels=["dog"] * 2,
                                                                           guidance_scale=2.0)))


# ----- the runner: progress from the pipeline's steps, Stop ends the run at the next step -----


def test_progress_follows_the_pipeline_steps_and_stop_ends_the_run(folders):
    pipe = load_pipeline(folders / "none")
    pipe.set_progress_bar_config(disable=True)
    runner = Runner({"generate": pipe})
    calls = []
    unet_calls = []
    pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))

    def progress(value, desc=None, unit=None):
        calls.append(value)

    images = runner("generate", "visitor", progress, "ddim", 4, batch_size=1, generator=torch.Generator().manual_seed(0))
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)] and len(images) == 1

    def stop_after_two(value, desc=None, unit=None):
        calls.append(value)
        if value == (2, 50):
            runner.stop(SimpleNamespace(session_hash="visitor"))

    calls.clear()
    unet_calls.clear()
    with pytest.raises(Stopped):
        runner("generate", "visitor", stop_after_two, "ddim", 50, batch_size=1)
    assert calls[-1] == (2, 50) and len(unet_calls) == 3  # step 3 ran, its callback stopped the run
    assert not runner.lock.locked() and not runner.stop_requests
    # Another visitor's stop does not end this one's run.
    runner.stop(SimpleNamespace(session_hash="someone else"))
    assert len(runner("generate", "visitor", progress, "ddim", 2, batch_size=1)) == 1


def test_stop_button_frees_the_pipeline_for_the_next_visitor(class_app, tmp_path):
    url, pipes = class_app
    pipe = pipes["generate"]
    unet_calls = []
    hook = pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    try:
        c = client(url, tmp_path)
        job = c.submit(0, 1, "ddim", 200, "cat", 2.0, api_name="/generate")
        started = threading.Event()
        for _ in range(600):
            if len(unet_calls) >= 3:
                started.set()
                break
            threading.Event().wait(0.05)
        assert started.is_set(), "the long run did not start"
        c.predict(api_name="/stop")  # the Stop button, in the same session
        # The next visitor gets the pipeline long before the 200 steps would have passed.
        got = client(url, tmp_path / "next").predict(4, 1, "ddim", STEPS, "dog", 2.0, api_name="/generate")
        assert len(got) == 1 and len(unet_calls) < 100
        assert not job.done() or job.status().code.name in ("CANCELLED", "FINISHED")
    finally:
        hook.remove()


def test_pipelines_without_the_callback_report_through_their_progress_bar():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32), norm_num_groups=8,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())  # diffusers' own: no callback_on_step_end
    runner = Runner({"generate": pipe})
    calls = []

    def progress(value, desc=None, unit=None):
        calls.append(value)
        if value == (2, 5):
            runner.stop(SimpleNamespace(session_hash="visitor"))

    assert len(runner("generate", "visitor", progress, "ddim", 1, batch_size=2)) == 2
    assert calls == [(0, 1), (1, 1)] and "progress_bar" not in pipe.__dict__
    calls.clear()
    with pytest.raises(Stopped):
        runner("generate", "visitor", progress, "ddim", 5, batch_size=1)
    assert calls == [(0, 5), (1, 5), (2, 5)] and "progress_bar" not in pipe.__dict__


def test_ldm_demo_refuses_what_is_not_a_model(tmp_path, capsys):
    from ldm.cli import main

    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "has no model_index.json" in capsys.readouterr().err
    assert main(["demo", "--model", "not/a/hub/id"]) == 2
    assert "neither a folder nor a Hub id" in capsys.readouterr().err
    assert main(["demo", "--model", "someone/not-downloaded"]) == 2  # offline: the download fails, clearly
    assert "downloading it from the Hub failed" in capsys.readouterr().err
