"""Each editing pipeline loads both ways, with the same images: ldm's class, and diffusers' DiffusionPipeline with
the folder's code in a process that cannot import ldm."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from helpers import tiny_unet, tiny_vae
from test_class_conditioning import BLOCK_LDM

from ldm.pipelines import (
    LatentDiffusionPipeline,
    LatentImg2ImgPipeline,
    LatentInpaintPipeline,
    LatentSuperResolutionPipeline,
)

STEPS = 3

SCRIPT = BLOCK_LDM + textwrap.dedent(
    """
    import numpy as np, torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    generation, img2img_dir, superres, out = sys.argv[1:5]
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(2)]

    results, names = {}, {}
    pipe = DiffusionPipeline.from_pretrained(generation, custom_pipeline="pipeline_latent_img2img",
                                             trust_remote_code=True)
    names["custom img2img"] = type(pipe).__name__
    results["img2img"] = pipe(image=image, strength=0.6, num_inference_steps=STEPS, generator=gens(),
                              output_type="np").images
    pipe = DiffusionPipeline.from_pretrained(generation, custom_pipeline="pipeline_latent_inpaint",
                                             trust_remote_code=True)
    names["custom inpaint"] = type(pipe).__name__
    results["inpaint"] = pipe(image=image, mask_image=mask, num_inference_steps=STEPS, jump_length=1,
                              jump_n_sample=2, generator=gens(), output_type="np").images
    pipe = DiffusionPipeline.from_pretrained(img2img_dir, trust_remote_code=True)
    names["saved img2img"] = type(pipe).__name__
    results["saved_img2img"] = pipe(image=image, strength=0.6, num_inference_steps=STEPS, generator=gens(),
                                    output_type="np").images
    pipe = DiffusionPipeline.from_pretrained(superres, trust_remote_code=True)
    names["superres"] = type(pipe).__name__
    results["superres"] = pipe(image=image[:, :, ::2, ::2], num_inference_steps=STEPS, generator=gens(),
                               output_type="np").images
    np.savez(out, **results)
    print(names)
    """
).replace("STEPS", str(STEPS))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("editing")
    torch.manual_seed(0)
    LatentDiffusionPipeline(vae=tiny_vae(), unet=tiny_unet(), scheduler=DDIMScheduler()).save_pretrained(
        root / "generation")
    LatentImg2ImgPipeline.from_pretrained(root / "generation").save_pretrained(root / "img2img")
    LatentSuperResolutionPipeline(vae=tiny_vae(), unet=tiny_unet(in_channels=7), scheduler=DDIMScheduler(),
                                  low_res_size=8).save_pretrained(root / "superres")
    return root


def gens():
    return [torch.Generator().manual_seed(i) for i in range(2)]


def test_saved_folders_name_their_class_and_carry_every_module(folders):
    for name, cls in (("generation", "LatentDiffusionPipeline"), ("img2img", "LatentImg2ImgPipeline"),
                      ("superres", "LatentSuperResolutionPipeline")):
        index = json.loads((folders / name / "model_index.json").read_text())
        assert index["_class_name"][1] == cls
        assert (folders / name / f"{index['_class_name'][0]}.py").is_file()
        assert {"pipeline_latent_img2img.py", "pipeline_latent_inpaint.py", "repaint.py", "image_inputs.py"} <= {
            p.name for p in (folders / name).iterdir()}
    assert json.loads((folders / "superres" / "model_index.json").read_text())["low_res_size"] == 8


def test_remote_code_loads_every_editing_pipeline_with_the_same_images(folders, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = tmp_path / "remote.npz"
    result = subprocess.run(
        [sys.executable, "-I", "-c", SCRIPT, str(folders / "generation"), str(folders / "img2img"),
         str(folders / "superres"), str(out)],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'custom img2img': 'LatentImg2ImgPipeline'" in result.stdout
    assert "'custom inpaint': 'LatentInpaintPipeline'" in result.stdout
    assert "'superres': 'LatentSuperResolutionPipeline'" in result.stdout
    remote = np.load(out)

    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    img2img = LatentImg2ImgPipeline.from_pretrained(folders / "generation")
    assert type(img2img) is LatentImg2ImgPipeline
    local = img2img(image=image, strength=0.6, num_inference_steps=STEPS, generator=gens(), output_type="np").images
    np.testing.assert_allclose(remote["img2img"], local, atol=1e-5)
    np.testing.assert_allclose(remote["saved_img2img"], local, atol=1e-5)
    inpaint = LatentInpaintPipeline.from_pretrained(folders / "generation")
    local = inpaint(image=image, mask_image=mask, num_inference_steps=STEPS, jump_length=1, jump_n_sample=2,
                    generator=gens(), output_type="np").images
    np.testing.assert_allclose(remote["inpaint"], local, atol=1e-5)
    superres = LatentSuperResolutionPipeline.from_pretrained(folders / "superres")
    assert type(superres) is LatentSuperResolutionPipeline and superres.config.low_res_size == 8
    local = superres(image=image[:, :, ::2, ::2], num_inference_steps=STEPS, generator=gens(), output_type="np").images
    np.testing.assert_allclose(remote["superres"], local, atol=1e-5)
