"""The transformer backbone (denoiser.model.type: dit) in-process: config checks, the networks, and every pipeline on
tiny DiTs (unconditional, class with guidance, text, img2img, inpainting, super-resolution), saved and loaded."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, EulerDiscreteScheduler
from helpers import REPO, run, tiny_config, tiny_text_models, tiny_vae

from ldm.config import ConfigError, DenoiserModelConfig, load_config, parse_overrides
from ldm.dit import build_dit, build_text_dit
from ldm.pipelines import (
    LatentDiffusionPipeline,
    LatentImg2ImgPipeline,
    LatentInpaintPipeline,
    LatentSuperResolutionPipeline,
)
from ldm.pipelines.loading import (
    conditioning_of,
    folder_conditioning,
    folder_task,
    guidance_scale_of,
    load_pipeline,
    save_pipeline,
)
from ldm.pipelines.pipeline_latent_text_dit import LatentTextDiTPipeline
from ldm.train.unet import train_unet

DIT = DenoiserModelConfig(type="dit", patch_size=2, num_layers=2, width=32, num_attention_heads=2)
STEPS = 3
NAMES = [str(i) for i in range(10)]


def perturbed(model):
    """adaLN-Zero starts every prediction at 0: move the weights so that the output depends on the inputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_dit(class_embeddings: int = 1, low_res_channels: int = 0):
    torch.manual_seed(0)
    return perturbed(build_dit(DIT, 4, 8, class_embeddings, low_res_channels))


def dit_pipeline(num_classes: int | None = None, class_embeddings: int | None = None, scheduler=None, channels=1):
    pipe = LatentDiffusionPipeline(vae=tiny_vae(channels), scheduler=scheduler or DDIMScheduler(),
                                   transformer=tiny_dit(class_embeddings or num_classes or 1),
                                   num_classes=num_classes, class_names=NAMES[:num_classes] if num_classes else None,
                                   guidance_scale=2.0 if num_classes else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, seed=0, **kwargs) -> np.ndarray:
    return pipe(generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS, output_type="np",
                **kwargs).images


# --- config ---------------------------------------------------------------------------------------------------------

def dit_config(*args: str):
    return load_config(REPO / "configs/tiny.yaml", parse_overrides(["--model.type=dit", *args], stage="unet"))


def test_tiny_config_trains_either_backbone_from_the_command_line():
    cfg = dit_config()
    assert cfg.denoiser.model.type == "dit" and cfg.denoiser.model.num_layers == 2
    # an older config's `unet:` section and --unet.x overrides are read as the denoiser's
    old = load_config(None, parse_overrides(["--unet.model.type=dit", "--unet.model.width=96"]))
    assert old.denoiser.model.type == "dit" and old.denoiser.model.width == 96


@pytest.mark.parametrize("args, words", [
    (["--model.num_attention_heads=3"], r"num_attention_heads=3 does not divide denoiser.model.width=32"),
    (["--model.width=30"], r"denoiser.model.width=30: must be a multiple of 4"),
    (["--model.sample_size=8", "--model.patch_size=3"], r"patch_size=3 does not divide the 8x8 latents"),
    (["--model.patch_size=0"], r"denoiser.model.patch_size: must be positive"),
    (["--model.block_out_channels=[64,64]"], r"block_out_channels sizes the unet backbone, but denoiser.model.type=dit"),
    (["--model.layers_per_block=3"], r"layers_per_block sizes the unet backbone"),
    (["--model.stock_pipeline=true"], r"stock_pipeline=true: diffusers' DiTPipeline samples class-conditional models"),
    (["--model.stock_pipeline=true", "--conditioning=class", "--sample_scheduler=euler"],
     r"denoiser.sample_scheduler=euler.*unit noise"),
    (["--model.stock_pipeline=true", "--conditioning=class", "--diffusion.objective=flow"],
     r"stock_pipeline=true with denoiser.diffusion.objective=flow"),
])
def test_bad_transformer_config_is_a_clear_error(args, words):
    with pytest.raises(ConfigError, match=words):
        dit_config(*args)


def test_transformer_keys_are_refused_for_a_unet():
    with pytest.raises(ConfigError, match=r"denoiser.model.patch_size sizes the dit backbone, but denoiser.model.type=unet"):
        load_config(REPO / "configs/tiny.yaml", parse_overrides(["--model.patch_size=4"], stage="unet"))


@pytest.fixture
def vae_dir(tmp_path):
    def save(shift=None):
        torch.manual_seed(0)
        vae = tiny_vae(1)
        if shift is not None:
            vae.register_to_config(shift_factor=shift)
        path = tmp_path / f"vae-{shift}"
        vae.save_pretrained(path)
        return path
    return save


def test_patch_size_must_divide_the_vae_latents_before_any_work(vae_dir, tmp_path):
    cfg = tiny_config(tmp_path, **{"denoiser.model.type": "dit", "denoiser.model.patch_size": 3,
                                   "denoiser.vae_path": str(vae_dir())})
    with pytest.raises(ConfigError, match=r"patch_size=3 does not divide the VAE's 8x8 latents \(16 px"):
        run(train_unet, cfg)
    assert not (tmp_path / "latent_cache").exists()  # no work was done


def test_stock_pipeline_with_a_shifted_autoencoder_fails_before_any_work(vae_dir, tmp_path):
    cfg = tiny_config(tmp_path, **{"denoiser.model.type": "dit", "denoiser.conditioning": "class",
                                   "denoiser.model.stock_pipeline": True, "denoiser.vae_path": str(vae_dir(0.25))})
    with pytest.raises(ConfigError, match=r"stock_pipeline=true .* shift_factor 0.2500, which DiTPipeline never adds"):
        run(train_unet, cfg)
    assert not (tmp_path / "latent_cache").exists()


@pytest.mark.parametrize("stock, null", [(None, 1000), (False, 10)])
def test_condition_dropout_uses_the_dit_null_class(vae_dir, tmp_path, stock, null):
    from diffusers import AutoencoderKL

    from ldm.train.conditioning import ClassConditioning

    cfg = tiny_config(tmp_path, **{"denoiser.model.type": "dit", "denoiser.conditioning": "class",
                                   "denoiser.model.stock_pipeline": stock})
    conditioning = ClassConditioning(10, None, cond_dropout=0.5, guidance_scale=1.5)
    model = conditioning.build_model(cfg, AutoencoderKL.from_pretrained(vae_dir()))
    assert conditioning.null_class == null == model.config.num_embeds_ada_norm
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True)
    torch.manual_seed(0)
    conditioning.model_output(model, torch.randn(64, 4, 8, 8), torch.full((64,), 10), {"label": torch.full((64,), 3)},
                              train=True)
    assert set(seen[0].tolist()) == {3, null}


# --- networks -------------------------------------------------------------------------------------------------------

def test_dit_has_fixed_variance_and_starts_as_adaln_zero():
    torch.manual_seed(0)
    model = build_dit(DIT, 4, 8, class_embeddings=10, low_res_channels=1)
    assert model.config.in_channels == 5 and model.config.out_channels == 4  # no learned-variance half
    x, t = torch.randn(2, 5, 8, 8), torch.tensor([10, 900])
    out = model(x, t, class_labels=torch.tensor([1, 10])).sample
    assert out.shape == (2, 4, 8, 8) and not out.any()  # zeroed output layer and block gates
    model.train()  # diffusers' built-in label dropout (p = 0.1 per block) is off: train-mode calls are repeatable
    perturbed(model).train()
    labels = torch.arange(10).repeat(5)
    x, t = torch.randn(50, 5, 8, 8), torch.full((50,), 500)
    assert torch.equal(model(x, t, class_labels=labels).sample, model(x, t, class_labels=labels).sample)


def test_text_transformer_reads_the_encoder_width():
    torch.manual_seed(0)
    model = build_text_dit(DIT, 4, 8, caption_channels=24)
    assert model.config.caption_channels == 24 and model.config.out_channels == 4
    assert model.config.cross_attention_dim == 32 and not model.use_additional_conditions
    out = model(torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 24), timestep=torch.tensor([1, 2]))
    assert not out.sample.any()  # PixArt's zeroed cross-attention outputs and output layer


# --- pipelines ------------------------------------------------------------------------------------------------------

def test_unconditional_dit_samples_saves_and_loads(tmp_path):
    pipe = dit_pipeline()
    images = sample(pipe, batch_size=2)
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()
    assert not np.allclose(images[0], images[1])
    pipe.save_pretrained(tmp_path / "f")
    index = json.loads((tmp_path / "f" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latent_diffusion", "LatentDiffusionPipeline"]
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"] and index["unet"] == [None, None]
    assert folder_conditioning(tmp_path / "f") == ("none", None, None) and folder_task(tmp_path / "f") == "generate"
    loaded = load_pipeline(tmp_path / "f")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is LatentDiffusionPipeline and loaded.unet is None and loaded.num_classes is None
    np.testing.assert_allclose(sample(loaded, batch_size=2), images, atol=1e-6)


def reference_guided(pipe, labels, guidance_scale, null):
    """DDIM written out with separate conditional and null-class transformer calls."""
    latents = torch.randn((len(labels), 4, 8, 8), generator=torch.Generator().manual_seed(0))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            ts = t.expand(len(labels))
            eps = pipe.transformer(latents, ts, class_labels=torch.tensor(labels)).sample
            eps_null = pipe.transformer(latents, ts, class_labels=torch.full((len(labels),), null)).sample
            latents = scheduler.step(eps_null + guidance_scale * (eps - eps_null), t, latents).prev_sample
        return pipe.to_output(pipe.decode_latents(latents), "np")


@pytest.mark.parametrize("embeddings", [1000, 10])
def test_class_dit_guides_against_its_last_embedding(embeddings):
    pipe = dit_pipeline(num_classes=10, class_embeddings=embeddings)
    assert pipe.null_class == embeddings and pipe.num_classes == 10
    guided = sample(pipe, class_labels=[3, 7], guidance_scale=3.0)
    np.testing.assert_allclose(guided, reference_guided(pipe, [3, 7], 3.0, embeddings), atol=1e-5)
    assert np.abs(guided - sample(pipe, class_labels=[3, 7], guidance_scale=1.0)).max() > 1e-3
    assert np.abs(guided - sample(pipe, class_labels=[4, 7], guidance_scale=3.0))[0].max() > 1e-3
    with pytest.raises(ValueError, match="class_labels: 10 .* out of range"):
        pipe(class_labels=[10], num_inference_steps=1)


def test_class_dit_is_saved_as_a_stock_dit_pipeline_folder(tmp_path, capsys):
    pipe = dit_pipeline(num_classes=10, class_embeddings=1000)
    save_pipeline(pipe, tmp_path / "f")
    assert "not a stock DiTPipeline" not in capsys.readouterr().out
    index = json.loads((tmp_path / "f" / "model_index.json").read_text())
    # diffusers drops "_" keys silently: DiTPipeline loads the folder without a warning about ldm's keys
    assert index["_class_name"] == "DiTPipeline" and "unet" not in index
    assert index["_num_classes"] == 10 and index["_class_names"] == NAMES and index["_guidance_scale"] == 2.0
    assert index["id2label"]["3"] == "3"
    assert (tmp_path / "f" / "pipeline_latent_diffusion.py").is_file()  # custom_pipeline= and the demo still work
    assert folder_conditioning(tmp_path / "f") == ("class", NAMES, 10)
    ours = load_pipeline(tmp_path / "f")
    assert type(ours) is LatentDiffusionPipeline and guidance_scale_of(ours) == 2.0
    stock = DiTPipeline.from_pretrained(tmp_path / "f")
    stock.set_progress_bar_config(disable=True)
    expected = sample(pipe, class_labels=[3, 7], guidance_scale=2.5)
    np.testing.assert_allclose(sample(stock, class_labels=stock.get_label_ids(["3", "7"]), guidance_scale=2.5),
                               expected, atol=1e-5)
    np.testing.assert_allclose(sample(ours, class_labels=[3, 7], guidance_scale=2.5), expected, atol=1e-6)
    ours.save_pretrained(tmp_path / "again")  # a round trip keeps the stock form
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["_class_name"] == "DiTPipeline"


@pytest.mark.parametrize("embeddings, scheduler, words", [
    (10, DDIMScheduler(), "its null class is 10"),
    (1000, EulerDiscreteScheduler(), "its sampler EulerDiscreteScheduler starts from noise of std"),
])
def test_class_dit_that_dit_pipeline_would_draw_wrong_is_saved_as_ldms_and_says_so(embeddings, scheduler, words,
                                                                                    tmp_path, capsys):
    save_pipeline(dit_pipeline(num_classes=10, class_embeddings=embeddings, scheduler=scheduler), tmp_path / "f")
    assert f"not a stock DiTPipeline folder: {words}" in capsys.readouterr().out
    index = json.loads((tmp_path / "f" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latent_diffusion", "LatentDiffusionPipeline"]
    assert index["num_classes"] == 10


def test_shifted_autoencoder_keeps_a_class_dit_out_of_dit_pipeline(tmp_path, capsys):
    pipe = dit_pipeline(num_classes=10, class_embeddings=1000)
    pipe.vae.register_to_config(shift_factor=0.3)
    save_pipeline(pipe, tmp_path / "f")
    assert "shift_factor 0.3000, which DiTPipeline never adds back" in capsys.readouterr().out
    assert isinstance(json.loads((tmp_path / "f" / "model_index.json").read_text())["_class_name"], list)


def test_text_dit_samples_with_guidance_and_negative_prompts(tmp_path):
    prompts = ["a handwritten digit 3", "a handwritten digit 8"]
    tokenizer, encoder, vae, _ = tiny_text_models(prompts, tmp_path / "tokenizer")
    torch.manual_seed(0)
    transformer = perturbed(build_text_dit(DIT, 4, 8, caption_channels=encoder.config.hidden_size))
    pipe = LatentTextDiTPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, transformer=transformer,
                                 scheduler=DDIMScheduler(), guidance_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    assert conditioning_of(pipe) == "text"
    images = sample(pipe, prompt=prompts)
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()
    assert np.abs(images - sample(pipe, prompt=prompts, guidance_scale=1.0)).max() > 1e-3
    assert np.abs(images[:1] - sample(pipe, prompt=prompts[0], negative_prompt=prompts[1])).max() > 1e-3
    np.testing.assert_allclose(sample(pipe, prompt=prompts[0]), images[:1], atol=1e-5)  # a string is one prompt
    with pytest.raises(ValueError, match="negative_prompt: one string for all prompts or one per prompt"):
        pipe(prompt=prompts, negative_prompt=["a", "b", "c"])
    save_pipeline(pipe, tmp_path / "f")
    loaded = load_pipeline(tmp_path / "f")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is LatentTextDiTPipeline and guidance_scale_of(loaded) == 2.0
    assert folder_conditioning(tmp_path / "f")[0] == "text"
    np.testing.assert_allclose(sample(loaded, prompt=prompts), images, atol=1e-6)


def test_editing_pipelines_run_on_a_dit():
    pipe = dit_pipeline(num_classes=10, class_embeddings=1000)
    image = torch.rand(1, 1, 16, 16)
    img2img = LatentImg2ImgPipeline.from_pipe(pipe)
    assert img2img.transformer is pipe.transformer and img2img.num_classes == 10
    recon = img2img(image=image, strength=0.0, class_labels=3, output_type="np").images
    edited = sample(img2img, image=image, strength=0.6, class_labels=3)
    assert recon.shape == edited.shape == (1, 16, 16, 1) and np.abs(edited - recon).max() > 1e-3
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    inpaint = LatentInpaintPipeline.from_pipe(pipe)
    filled = inpaint(image=image, mask_image=mask, class_labels=[7], num_inference_steps=4, jump_length=2,
                     jump_n_sample=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(filled[..., :4, :], image[..., :4, :])  # pasted back exactly


def test_superres_dit_upscales_and_is_recognised(tmp_path):
    pipe = LatentSuperResolutionPipeline(vae=tiny_vae(1), scheduler=DDIMScheduler(),
                                         transformer=tiny_dit(low_res_channels=1), low_res_size=8)
    pipe.set_progress_bar_config(disable=True)
    low_res = torch.rand(2, 1, 8, 8)
    images = sample(pipe, image=low_res)
    assert images.shape == (2, 16, 16, 1) and np.abs(images - sample(pipe, image=low_res.flip(-1))).max() > 1e-3
    pipe.save_pretrained(tmp_path / "sr")
    assert folder_task(tmp_path / "sr") == "superres"
    with pytest.raises(ValueError, match="super-resolution model"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "sr")(batch_size=1)


def test_exactly_one_denoiser():
    with pytest.raises(ValueError, match="exactly one of them"):
        LatentDiffusionPipeline(vae=tiny_vae(1), scheduler=DDIMScheduler())


def test_unet_folders_saved_before_the_transformer_still_load(tmp_path):
    from helpers import tiny_unet

    pipe = LatentDiffusionPipeline(vae=tiny_vae(1), unet=tiny_unet(), scheduler=DDIMScheduler())
    pipe.save_pretrained(tmp_path / "f")
    index_file = tmp_path / "f" / "model_index.json"
    index = json.loads(index_file.read_text())
    assert index["transformer"] == [None, None]
    del index["transformer"]  # as every folder saved before ldm had a transformer
    index_file.write_text(json.dumps(index))
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "f")
    assert loaded.transformer is None and loaded.denoiser is loaded.unet
    assert folder_conditioning(tmp_path / "f") == ("none", None, None)
