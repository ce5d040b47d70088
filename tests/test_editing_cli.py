"""`ldm edit`, `ldm upscale` and `ldm eval --task ...` on tiny untrained 16 px grayscale models."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler
from helpers import tiny_unet, tiny_vae
from PIL import Image

from ldm.cli import main
from ldm.pipelines import LatentDiffusionPipeline, LatentSuperResolutionPipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    LatentDiffusionPipeline(vae=tiny_vae(1), unet=tiny_unet(), scheduler=DDIMScheduler()).save_pretrained(
        root / "generation")
    LatentSuperResolutionPipeline(vae=tiny_vae(1), unet=tiny_unet(4 + 1), scheduler=DDIMScheduler(),
                                  low_res_size=8).save_pretrained(root / "superres")
    return {"generation": root / "generation", "superres": root / "superres"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder of three 16 px images (one RGB: converted to the model's mode), a folder of 8 px ones, a mask."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    (root / "big").mkdir()
    (root / "small").mkdir()
    for i in range(3):
        mode = "RGB" if i == 2 else "L"
        shape = (16, 16, 3) if mode == "RGB" else (16, 16)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / "big" / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(root / "small" / f"{i}.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 2:10] = 255
    Image.fromarray(mask).save(root / "mask.png")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def test_edit_img2img_folder_and_inpaint_file(models, inputs, tmp_path):
    out = tmp_path / "edited"
    assert main(["edit", "--model", str(models["generation"]), "--image", str(inputs / "big"), "--strength", "0.5",
                 "--steps", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png"]
    assert {Image.open(p).size for p in out.iterdir()} == {(16, 16)}

    # Inpainting a single file: every pixel outside the mask is the input's.
    target = tmp_path / "filled.png"
    assert main(["edit", "--model", str(models["generation"]), "--image", str(inputs / "big" / "0.png"), "--mask",
                 str(inputs / "mask.png"), "--steps", "3", "--jump_n_sample", "2", "--jump_length", "1",
                 "--out", str(target)]) == 0
    given, got = np.asarray(Image.open(inputs / "big" / "0.png")), np.asarray(Image.open(target))
    kept = np.asarray(Image.open(inputs / "mask.png")) == 0
    np.testing.assert_array_equal(got[kept], given[kept])
    assert (got[~kept] != given[~kept]).any()


def test_upscale_file_and_folder(models, inputs, tmp_path):
    assert main(["upscale", "--model", str(models["superres"]), "--image", str(inputs / "small" / "1.png"),
                 "--steps", "2", "--out", str(tmp_path / "big.png")]) == 0
    assert Image.open(tmp_path / "big.png").size == (16, 16)
    assert main(["upscale", "--model", str(models["superres"]), "--image", str(inputs / "small"), "--steps", "2",
                 "--batch_size", "2", "--out", str(tmp_path / "many")]) == 0
    assert len(list((tmp_path / "many").glob("*.png"))) == 3


@pytest.mark.parametrize(("args", "words"), [
    (["edit", "--model", "{generation}", "--image", "{inputs}/missing.png", "--out", "x.png"], "--image"),
    (["edit", "--model", "{generation}", "--image", "{inputs}/notes.txt", "--out", "x.png"], "not an image"),
    (["edit", "--model", "{generation}", "--image", "{inputs}/broken.png", "--out", "x.png"], "not an image"),
    (["edit", "--model", "{generation}", "--image", "{inputs}/small/0.png", "--out", "x.png"], "8x8"),
    (["edit", "--model", "{generation}", "--image", "{inputs}/big", "--strength", "1.5", "--out", "x"], "--strength"),
    (["edit", "--model", "{generation}", "--image", "{inputs}/big", "--mask", "{inputs}/mask.png", "--strength",
      "0.5", "--out", "x"], "--strength does not apply"),
    (["edit", "--model", "{superres}", "--image", "{inputs}/big", "--out", "x"], "use `ldm upscale`"),
    (["upscale", "--model", "{generation}", "--image", "{inputs}/small", "--out", "x"], "not trained for super"),
    (["sample", "--model", "{superres}", "--out", "x.png"], "use `ldm upscale`"),
    (["upscale", "--model", "{superres}", "--image", "{inputs}/big/0.png", "--out", "x.png"], "16x16"),
])
def test_bad_arguments_are_clear_errors(models, inputs, tmp_path, capsys, args, words):
    filled = [a.format(inputs=inputs, **models) for a in args]
    filled[filled.index("--out") + 1] = str(tmp_path / filled[filled.index("--out") + 1])
    assert main(filled) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_all_white_mask_is_refused_with_its_meaning(models, inputs, tmp_path, capsys):
    Image.new("L", (16, 16), 255).save(tmp_path / "white.png")
    assert main(["edit", "--model", str(models["generation"]), "--image", str(inputs / "big" / "0.png"), "--mask",
                 str(tmp_path / "white.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "sampling from noise" in capsys.readouterr().err


# ----- ldm eval --task -----


@pytest.fixture(scope="module")
def data_config(tmp_path_factory) -> Path:
    """configs/tiny.yaml (digits, 16 px) with every image and x2 super-resolution pairs (8 px low-res)."""
    cfg = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    cfg["data"]["max_samples"] = None
    cfg["data"]["degrade"] = {"factor": 2}
    path = tmp_path_factory.mktemp("data") / "digits16.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def classifier(data_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "classifier"
    assert main(["train-classifier", "--data", str(data_config), "--out", str(out), "--epochs", "1"]) == 0
    return out


def run_task(task, model, data_config, classifier, out, *extra) -> dict:
    assert main(["eval", "--task", task, "--model", str(model), "--data", str(data_config), "--features",
                 str(classifier), "--num_samples", "6", "--steps", "2", "--cache_dir", str(out.parent / "cache"),
                 "--out", str(out), "--figure", str(out.with_suffix(".fig.png")), "--figure_rows", "3",
                 *extra]) == 0
    assert Image.open(out.with_suffix(".fig.png")).size[1] == 3 * 16
    return json.loads(out.read_text())


def test_eval_superres_reports_ldm_beside_bicubic(models, data_config, classifier, tmp_path):
    result = run_task("superres", models["superres"], data_config, classifier, tmp_path / "sr.json")
    assert result["num_images"] == 6 and result["low_res_size"] == 8
    for row in ("ldm", "bicubic", "bicubic_torch"):
        assert {"psnr", "ssim", "classifier-FID"} <= set(result[row])
    assert "classifier-FID" in result["originals"]
    # The 16 px digits are PIL-bicubic enlargements of 8 px scans at most 2x smaller, so bicubic is close to them.
    assert result["bicubic"]["psnr"] > result["ldm"]["psnr"]


def test_eval_inpaint_paste_back_is_exact(models, data_config, classifier, tmp_path):
    result = run_task("inpaint", models["generation"], data_config, classifier, tmp_path / "inpaint.json")
    for kind in ("centre", "random"):
        assert result[kind]["max_abs_diff_outside_mask"] == 0.0
        assert result[kind]["psnr_outside_mask"] == 100.0  # the cap: identical pixels
        assert result[kind]["psnr_outside_mask_no_paste_back"] < 40  # an untrained autoencoder's error
    assert "classifier-FID" in result["unmasked_samples"]


def test_eval_img2img_writes_csv_and_plot(models, data_config, classifier, tmp_path):
    result = run_task("img2img", models["generation"], data_config, classifier, tmp_path / "i2i.json",
                      "--strengths", "0,1")
    rows = result["rows"]
    assert [r["strength"] for r in rows] == [0.0, 1.0]
    # Strength 0 is the autoencoder's reconstruction of the held-out images (PSNR as eval-vae would measure it).
    from ldm.config import load_config
    from ldm.data import build_datasets
    from ldm.eval import metrics as M
    from ldm.eval.editing import holdout_tensors
    from ldm.pipelines.latents import decode, encode

    _, holdout, _ = build_datasets(load_config(data_config).data)
    images, _ = holdout_tensors(holdout, 6)
    vae = LatentDiffusionPipeline.from_pretrained(models["generation"]).vae
    with torch.no_grad():
        recon = decode(vae, encode(vae, images, sample=False)).clamp(-1, 1)
    assert rows[0]["psnr"] == pytest.approx(M.psnr(recon, images).mean().item(), abs=1e-3)
    assert rows[1]["psnr"] != pytest.approx(rows[0]["psnr"], abs=1e-3)
    assert (tmp_path / "i2i.csv").read_text().startswith("num_images,strength,")
    assert Image.open(tmp_path / "i2i.png").size[0] > 100


def test_eval_task_checks_the_model_kind(models, data_config, capsys):
    assert main(["eval", "--task", "superres", "--model", str(models["generation"]), "--data", str(data_config)]) == 2
    assert "not trained for super-resolution" in capsys.readouterr().err
    assert main(["eval", "--task", "inpaint", "--model", str(models["superres"]), "--data", str(data_config)]) == 2
    assert "super-resolution model" in capsys.readouterr().err
