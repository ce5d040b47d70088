"""`ldm eval` / `ldm sweep` on conditional models: equal numbers per class, accuracy on the requested class, the
guidance sweep, and the errors for conditions a model does not take."""

import json
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler
from PIL import Image
from test_class_conditioning import class_pipeline
from test_eval_cli import classifier_dir, data_config, model_dir  # noqa: F401  (module fixtures)

from ldm.cli import main
from ldm.data import collate
from ldm.eval.conditional import SamplePlan, plan_for
from ldm.eval.evaluation import evaluate_pipeline, load_data, resolve_data
from ldm.eval.features import cached_real_features, load_feature_network
from ldm.eval.sweep import read_csv
from ldm.pipelines.pipeline_common import DEFAULT_GUIDANCE_SCALE


def test_plan_draws_every_class_equally_whichever_process_draws_them():
    plan = SamplePlan.classes(10, guidance_scale=2.0)
    halves = [list(range(20)), list(range(20, 40))]  # how two processes split 40 samples
    requested = plan.requested(halves[0]) + plan.requested(halves[1])
    assert np.bincount(requested).tolist() == [4] * 10
    assert plan.pipe_kwargs([3, 14]) == {"class_labels": [3, 4], "guidance_scale": 2.0}
    text = SamplePlan.text(["a 0", "a 1"], [0, 1], 5.0)
    assert text.pipe_kwargs([0, 1, 2]) == {"prompt": ["a 0", "a 1", "a 0"], "guidance_scale": 5.0}
    assert SamplePlan.unconditional().pipe_kwargs([0, 1]) == {"batch_size": 2}


class RealDigitsPipeline:
    """Stands in for a class model: returns a real training image of class (label + shift) % 10."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int):
        self.by_class = {k: images[labels == k] for k in range(10)}
        self.shift, self.scheduler, self.calls = shift, DDIMScheduler(), []

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, class_labels, guidance_scale, generator, num_inference_steps, eta, output_type):
        self.calls.append(list(class_labels))
        picks = [self.by_class[(k + self.shift) % 10][g.initial_seed() // 10] for k, g in zip(class_labels, generator)]
        return SimpleNamespace(images=torch.stack(picks) / 2 + 0.5)


def test_accuracy_is_measured_on_the_requested_class(data_config, classifier_dir):  # noqa: F811
    train, _, info = load_data(str(data_config), 1, 16)
    batch = collate([train[i] for i in range(400)])
    network = load_feature_network(classifier_dir)
    real = cached_real_features(network, train, info.fingerprint, "train", None)
    plan = SamplePlan.classes(10, guidance_scale=2.0)
    results = {}
    for shift in (0, 3):
        pipe = RealDigitsPipeline(batch["pixel_values"], batch["label"], shift)
        results[shift] = evaluate_pipeline(pipe, network, real, 40, 1, 16, plan=plan)
        assert np.bincount([k for call in pipe.calls for k in call]).tolist() == [4] * 10
    right, wrong = results[0]["metrics"], results[3]["metrics"]
    assert right["accuracy"] >= 0.9 and wrong["accuracy"] <= 0.1
    assert len(right["per_class_accuracy"]) == 10 and min(right["per_class_accuracy"]) >= 0.5
    assert results[0]["conditioning"] == "class" and results[0]["guidance_scale"] == 2.0


@pytest.fixture(scope="module")
def class_model_dir(tmp_path_factory):
    """An untrained class model with the data's shapes: 16x16 grayscale, 10 classes named as the digits."""
    path = tmp_path_factory.mktemp("class") / "pipeline"
    class_pipeline(class_names=[str(i) for i in range(10)], num_classes=10).save_pretrained(path)
    return path


def test_eval_and_guidance_sweep_of_a_class_model(class_model_dir, data_config, classifier_dir, tmp_path):  # noqa: F811
    common = ["--model", str(class_model_dir), "--data", str(data_config), "--features", str(classifier_dir),
              "--num_samples", "20", "--batch_size", "20", "--cache_dir", str(tmp_path / "cache")]
    out = tmp_path / "eval.json"
    assert main(["eval", *common, "--steps", "2", "--metrics", "fid", "--guidance_scale", "2",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["conditioning"], result["guidance_scale"], result["num_conditions"]) == ("class", 2.0, 10)
    metrics = result["metrics"]
    assert 0 <= metrics["accuracy"] <= 1 and len(metrics["per_class_accuracy"]) == 10
    assert metrics["accuracy"] == pytest.approx(np.mean(metrics["per_class_accuracy"]))  # 2 samples of each class

    # Guidance scales and timestep spacings in one sweep: every combination, typed when read back.
    assert main(["sweep", *common, "--steps", "2", "--guidance_scales", "1,4", "--timestep_spacing", "leading,trailing",
                 "--out_dir", str(tmp_path / "sw")]) == 0
    rows = read_csv(tmp_path / "sw" / "sweep.csv")
    assert [(r["scheduler"], r["timestep_spacing"], r["steps"], r["guidance_scale"]) for r in rows] == [
        ("ddim", spacing, 2, g) for spacing in ("leading", "trailing") for g in (1.0, 4.0)]
    assert rows[0]["value"] != rows[1]["value"] and rows[0]["value"] != rows[2]["value"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    with Image.open(tmp_path / "sw" / "sweep.png") as plot:
        assert plot.width > 500


def test_conditions_a_model_does_not_take_are_clear_errors(class_model_dir, model_dir, data_config,  # noqa: F811
                                                           classifier_dir, tmp_path, capsys):  # noqa: F811
    base = ["--data", str(data_config), "--features", str(classifier_dir), "--cache_dir", str(tmp_path)]
    assert main(["eval", "--model", str(class_model_dir), *base, "--num_samples", "15"]) == 2
    assert "does not split equally over the model's 10 classes" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), *base, "--guidance_scale", "2"]) == 2
    assert "unconditional, it takes no guidance" in capsys.readouterr().err
    assert main(["sweep", "--model", str(model_dir), *base, "--guidance_scales", "1,2"]) == 2
    assert "unconditional, it takes no guidance" in capsys.readouterr().err


def test_text_models_are_evaluated_on_the_prompt_of_each_class(data_config, tmp_path):  # noqa: F811
    cfg = yaml.safe_load(data_config.read_text())
    cfg["data"]["caption_template"] = "a handwritten digit {name}"
    (tmp_path / "text.yaml").write_text(yaml.safe_dump(cfg))
    _, _, info = load_data(str(tmp_path / "text.yaml"), 1, 16)
    data_cfg = resolve_data(str(tmp_path / "text.yaml"), 1, 16)
    text_pipe = SimpleNamespace(tokenizer=object(), text_encoder=object(), config={})  # no scale saved
    plan = plan_for(text_pipe, data_cfg, info)
    assert plan.conditions == [f"a handwritten digit {k}" for k in range(10)] and plan.labels == list(range(10))
    assert plan.guidance_scale == DEFAULT_GUIDANCE_SCALE  # a model saved without its own scale; not SD's 7.5


def test_text_models_without_a_template_are_evaluated_on_the_data_captions(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # not the user's cache
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(np.full((16, 16), 60 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"grey {i % 2}"}))
    (tmp_path / "imgs" / "metadata.jsonl").write_text("\n".join(rows))
    data_cfg = resolve_data(str(tmp_path / "imgs"), 1, 16)
    _, _, info = load_data(str(tmp_path / "imgs"), 1, 16)
    plan = plan_for(SimpleNamespace(tokenizer=object(), text_encoder=object()), data_cfg, info, 3.0)
    assert sorted(plan.conditions) == ["grey 0", "grey 1"] and plan.labels is None  # no class to be accurate on
    assert plan.requested([0, 1]) is None and plan.guidance_scale == 3.0
