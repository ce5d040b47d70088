"""The model card (README.md) written into every saved pipeline folder, so a pushed model explains itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldm.config import RunConfig, to_dict

SAMPLES_FILE = "samples.png"


def _data_description(cfg: RunConfig) -> tuple[str, str | None]:
    """Human-readable data source, and the Hub data set id for the card's metadata (if any)."""
    d = cfg.data
    if d.source == "digits":
        return "scikit-learn's bundled handwritten digits (1,797 8x8 scans)", None
    if d.source == "folder":
        return f"a local image folder (`{Path(d.path).name}`)", None
    is_hub_id = d.path is not None and not Path(d.path).exists()
    return f"the Hub data set `{d.path}` (split `{d.split}`)", d.path if is_hub_id else None


def _usage(cfg: RunConfig, repo_hint: str, example: str, stock_text: bool = True,
           stock_class: bool = False) -> tuple[str, str, str]:
    """(pipeline tag, title word, usage section) for the model's conditioning."""
    kind = cfg.denoiser.conditioning
    if kind == "text" and not stock_text:
        why = ("ldm's LatentTextDiTPipeline (its code is in this repository): no stock pipeline samples a PixArt "
               "transformer over this text encoder as it was trained" if cfg.denoiser.model.type == "dit" else
               "ldm's LatentTextToImagePipeline (its code is in this repository): " + _stock_text_problem(cfg))
        return "text-to-image", "text-to-image", f"""```python
import torch
from diffusers import DiffusionPipeline

# {why}.
pipe = DiffusionPipeline.from_pretrained("{repo_hint}", trust_remote_code=True)
images = pipe(["{example}"] * 4, guidance_scale={cfg.denoiser.guidance_scale}, num_inference_steps={cfg.denoiser.sample_steps},
              generator=torch.Generator().manual_seed(0)).images
```"""
    if kind == "text":
        return "text-to-image", "text-to-image", f"""```python
import torch
from diffusers import StableDiffusionPipeline

# A stock Stable Diffusion folder: no remote code, any diffusers scheduler, negative prompts, img2img.
pipe = StableDiffusionPipeline.from_pretrained("{repo_hint}")
images = pipe(["{example}"] * 4, guidance_scale={cfg.denoiser.guidance_scale}, num_inference_steps={cfg.denoiser.sample_steps},
              generator=torch.Generator().manual_seed(0)).images
```

With `ldm` installed: `ldm sample --model DIR --prompt "{example}" --num_images 8 --out grid.png`.{_grayscale_note(cfg)}"""
    remote = """```python
import torch
from diffusers import DiffusionPipeline

# The pipelines' code (pipeline_latent_*.py and their helpers) is part of this repository, hence
# trust_remote_code."""
    if kind == "class" and stock_class:
        return "unconditional-image-generation", "class-conditional", f"""```python
import torch
from diffusers import DiTPipeline

# A stock DiTPipeline folder: no remote code (class ids, or names through pipe.get_label_ids).
pipe = DiTPipeline.from_pretrained("{repo_hint}")
images = pipe(class_labels=[0, 1, 2, 3], guidance_scale={cfg.denoiser.guidance_scale}, num_inference_steps={cfg.denoiser.sample_steps},
              generator=torch.Generator().manual_seed(0)).images
```

DiTPipeline guides only at scales above 1 and draws the noise of a stochastic sampler's steps from torch's global
generator: with a deterministic sampler (DDIM, DPM-Solver++) it draws the images of ldm's pipeline. With `ldm`
installed: `LatentDiffusionPipeline.from_pretrained("{repo_hint}")`, or
`ldm sample --model DIR --class_labels all --num_images 8 --out grid.png` (one row per class)."""
    if kind == "class":
        return "unconditional-image-generation", "class-conditional", f"""{remote}
pipe = DiffusionPipeline.from_pretrained("{repo_hint}", trust_remote_code=True)
print(pipe.config.class_names)
images = pipe(class_labels=[0, 1, 2, 3], guidance_scale={cfg.denoiser.guidance_scale}, num_inference_steps={cfg.denoiser.sample_steps},
              generator=torch.Generator().manual_seed(0)).images
```

With `ldm` installed: `LatentDiffusionPipeline.from_pretrained("{repo_hint}")`, or
`ldm sample --model DIR --class_labels all --num_images 8 --out grid.png` (one row per class)."""
    if cfg.denoiser.task == "superres":
        size = cfg.data.resolution // cfg.data.degrade.factor
        return "image-to-image", "super-resolution", f"""{remote}
from PIL import Image

pipe = DiffusionPipeline.from_pretrained("{repo_hint}", trust_remote_code=True)
low_res = Image.open("small.png")  # {size}x{size}, the model's channels
image = pipe(image=low_res, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images[0]
```

With `ldm` installed: `ldm upscale --model DIR --image small.png --out big.png` (a file or a folder).{_grayscale_note(cfg)}"""
    return "unconditional-image-generation", "unconditional", f"""{remote}
pipe = DiffusionPipeline.from_pretrained("{repo_hint}", trust_remote_code=True)
images = pipe(batch_size=16, num_inference_steps={cfg.denoiser.sample_steps}, generator=torch.Generator().manual_seed(0)).images
```

With `ldm` installed: `LatentDiffusionPipeline.from_pretrained("{repo_hint}")`, or
`ldm sample --model DIR --num_images 16 --out grid.png`. Any diffusers scheduler can replace the saved one."""


def render_model_card(cfg: RunConfig, vae_metrics: dict[str, Any], repo_hint: str = "path/to/this/folder",
                      example_prompt: str = "a photo", stock_class: bool = False) -> str:
    """The card's Markdown; `stock_class`: the folder is a stock DiTPipeline one (a class DiT)."""
    data_text, dataset_id = _data_description(cfg)
    vae_m, unet_m, unet_t = cfg.vae.model, cfg.denoiser.model, cfg.denoiser.train
    diffusion = cfg.denoiser.diffusion
    factor = vae_metrics.get("downsampling_factor", 2 ** (len(vae_m.block_out_channels) - 1))
    channels = vae_metrics.get("latent_channels", vae_m.latent_channels)
    stock_text = (vae_metrics.get("shift_factor") is None and channels == 4 and unet_m.type == "unet"
                  and diffusion.objective == "ddpm")
    tag, title, usage = _usage(cfg, repo_hint, example_prompt, stock_text, stock_class)
    latent = cfg.data.resolution // factor
    metadata = [
        "---",
        "library_name: diffusers",
        f"pipeline_tag: {tag}",
        "tags:",
        "- latent-diffusion",
        f"- {tag}",
        "- ldm",
    ]
    if dataset_id:
        metadata += ["datasets:", f"- {dataset_id}"]
    metadata.append("---")
    rows = [
        ("data", data_text),
        ("images", f"{cfg.data.resolution}x{cfg.data.resolution} {cfg.data.color_mode}"),
        ("autoencoder", _autoencoder_text(vae_metrics, factor, vae_m.block_out_channels, latent, channels)),
        *_statistics_rows(vae_metrics),
        ("autoencoder held-out PSNR",
         f"{vae_metrics['holdout_psnr']:.2f} dB" if "holdout_psnr" in vae_metrics else "not measured"),
        _denoiser_row(cfg),
        ("conditioning", _conditioning_text(cfg)),
        ("diffusion", _diffusion_text(cfg)),
        ("saved sampler", _sampler_text(cfg)),
        (f"{_backbone_name(cfg)} training", (f"{unet_t.max_steps} steps, batch {unet_t.batch_size} per device, "
                           f"lr {unet_t.learning_rate}, EMA {unet_t.ema_decay if unet_t.use_ema else 'off'}, "
                           f"{unet_t.mixed_precision} precision")),
    ]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    return f"""{chr(10).join(metadata)}

# Latent diffusion model ({cfg.data.resolution}px, {title})

A latent diffusion model (Rombach et al. 2022) trained with `ldm` on {data_text}: a KL
autoencoder compresses images into latents, a {_backbone_name(cfg)} denoises those latents, and the autoencoder
decodes them.

![samples]({SAMPLES_FILE})

## Use

{usage}

## Training

{table}

The full training configuration is in `training_config.json`.
"""


def _backbone_name(cfg: RunConfig) -> str:
    return "DiT" if cfg.denoiser.model.type == "dit" else "UNet"


def _denoiser_row(cfg: RunConfig) -> tuple[str, str]:
    m, text = cfg.denoiser.model, cfg.denoiser.conditioning == "text"
    if m.type == "dit":
        network = "PixArtTransformer2DModel (cross-attention)" if text else "DiTTransformer2DModel (adaLN-Zero)"
        return "DiT", (f"{network}, patch {m.patch_size}, {m.num_layers} layers, width {m.width}, "
                       f"{m.num_attention_heads} heads")
    return "UNet", (f"{'UNet2DConditionModel' if text else 'UNet2DModel'}, channels {m.block_out_channels}, "
                    f"attention {m.attention}")


def _diffusion_text(cfg: RunConfig) -> str:
    d = cfg.denoiser.diffusion
    if d.objective == "flow":
        density = (f"logit-normal({d.logit_mean:g}, {d.logit_std:g})" if d.weighting_scheme == "logit_normal"
                   else "uniform")
        return (f"rectified flow, x_σ = (1 − σ)·x + σ·ε, predicts the velocity ε − x; σ {density} through shift "
                f"{d.flow_shift:g}, t = σ·{d.num_train_timesteps}")
    return (f"{d.num_train_timesteps} steps, {d.beta_schedule} betas {d.beta_start}..{d.beta_end}, predicts "
            f"{d.prediction_type}")


def _sampler_text(cfg: RunConfig) -> str:
    u = cfg.denoiser
    if u.diffusion.objective == "flow":
        return (f"`{u.sample_scheduler}`, shift {u.diffusion.flow_shift:g} (flow-matching samplers only: "
                f"FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler), {u.sample_steps} steps")
    return f"`{u.sample_scheduler}`, {u.sample_timestep_spacing} timestep spacing, {u.sample_steps} steps"


def _stock_text_problem(cfg: RunConfig) -> str:
    """Why a UNet text model is not a stock StableDiffusionPipeline folder (ldm.pipelines.text_to_image)."""
    if cfg.denoiser.diffusion.objective == "flow":
        return ("StableDiffusionPipeline cannot start a\n# flow-matching sampler (it scales the noise by the "
                "scheduler's init_noise_sigma, which FlowMatch schedulers lack)")
    return "StableDiffusionPipeline would decode without the\n# autoencoder's shift_factor"


def _autoencoder_text(vae_metrics: dict[str, Any], factor: int, block_out_channels, latent: int, channels: int) -> str:
    shape = f"f={factor}, latents {latent}x{latent}x{channels}"
    if "pretrained" not in vae_metrics:
        return f"AutoencoderKL, f={factor}, channels {block_out_channels}, latents {latent}x{latent}x{channels}"
    notes = [" decoder fine-tuned on this data" if vae_metrics.get("finetune") == "decoder" else "",
             " RGB autoencoder on grayscale images (gray in as 3 equal channels, channel mean out)"
             if vae_metrics.get("grayscale_converted") else ""]
    return f"pretrained `{vae_metrics['pretrained']}` (AutoencoderKL, {shape}){';'.join(n for n in notes if n)}"


def _statistics_rows(vae_metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The stored latent scale (and shift), beside the publisher's for a pretrained autoencoder."""
    def show(value):
        return "none" if value is None else f"{value:.4f}"

    if "scaling_factor" not in vae_metrics:
        return [("latent scaling factor", "?")]
    if "pretrained" not in vae_metrics:
        return [("latent scaling factor", show(vae_metrics["scaling_factor"]))]
    how = "measured on the training images" if vae_metrics.get("latent_stats") == "measure" else "the publisher's"
    scale = (f"{show(vae_metrics['scaling_factor'])} ({how}; publisher's "
             f"{show(vae_metrics.get('publisher_scaling_factor'))})")
    shift = (f"{show(vae_metrics.get('shift_factor'))} ({how}; publisher's "
             f"{show(vae_metrics.get('publisher_shift_factor'))})")
    measured = (f"mean {show(vae_metrics.get('measured_latent_mean'))}, "
                f"std {show(vae_metrics.get('measured_latent_std'))}")
    return [("latent scaling factor", scale), ("latent shift factor", shift),
            ("latents measured on the training images", measured)]


def _grayscale_note(cfg: RunConfig) -> str:
    if cfg.data.color_mode != "grayscale":
        return ""
    return ("\n\nThe model is grayscale (a 1-channel autoencoder): it returns mode-\"L\" images, and image-to-image "
            "pipelines need 1-channel input images too (`image.convert(\"L\")`); an RGB image stops in the "
            "autoencoder's first convolution with a channel-count error.")


def _conditioning_text(cfg: RunConfig) -> str:
    u = cfg.denoiser
    if u.task == "superres":
        g = cfg.data.degrade
        return (f"super-resolution (LDM-SR): the {cfg.data.resolution // g.factor}px low-res image (x{g.factor}, "
                f"blur sigma <= {g.blur_sigma}, noise std <= {g.noise_std}) concatenated with the latents")
    if u.conditioning == "none":
        return "none (unconditional)"
    dropout = f"condition dropout {u.diffusion.cond_dropout} for classifier-free guidance"
    if u.conditioning == "class":
        return f"class labels (class embedding + null class), {dropout}"
    encoder = (f"pretrained frozen `{u.text_encoder}`" if u.text_encoder else
               f"CLIPTextModel trained from scratch ({u.text_model.num_layers} layers, width {u.text_model.hidden_size})")
    return f"text through {encoder}, cross-attention, {dropout}"


def write_model_card(pipeline_dir: Path, cfg: RunConfig, samples: Path | None = None,
                     repo_hint: str | None = None, conditioning=None) -> Path:
    """Write README.md (+ samples.png, training_config.json) into a saved pipeline folder."""
    pipeline_dir = Path(pipeline_dir)
    metrics_file = Path(cfg.output_dir) / "vae" / "metrics.json"
    vae_metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    if samples is not None:
        (pipeline_dir / SAMPLES_FILE).write_bytes(Path(samples).read_bytes())
    (pipeline_dir / "training_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    card = pipeline_dir / "README.md"
    prompts = getattr(conditioning, "prompts", None)
    index_file = pipeline_dir / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    card.write_text(render_model_card(cfg, vae_metrics, repo_hint or str(pipeline_dir),
                                      example_prompt=prompts[0] if prompts else "a photo",
                                      stock_class=index.get("_class_name") == "DiTPipeline"))
    return card
