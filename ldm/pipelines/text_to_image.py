"""Text-to-image models are saved as stock diffusers `StableDiffusionPipeline` folders (when that draws right).

A text-conditioned model is exactly Stable Diffusion's composition (AutoencoderKL, a transformers text encoder and
tokenizer, a cross-attention UNet2DConditionModel, a scheduler), so it needs no code of its own: on a machine with only
diffusers and transformers, `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`, `DiffusionPipeline` and
`AutoPipelineForText2Image` load the folder without `trust_remote_code`, and the whole Stable Diffusion tool chain
(schedulers, negative prompts, img2img, LoRA training scripts, ...) reads it.

The exceptions: `StableDiffusionPipeline` decodes ``D(z / scaling_factor)``, never adding a `shift_factor` back, and it
starts sampling from ``ε · scheduler.init_noise_sigma``, which diffusers' flow-matching schedulers do not have (it
fails with an AttributeError). So a model whose autoencoder has a shift or other than Stable Diffusion's 4 latent
channels, and a flow-matching model (`diffusion.objective: flow`), is made as ldm's own `LatentTextToImagePipeline`
(the same sampling, started from unit noise for flow, decoded through `latents.decode`, its code saved in the folder)
and `save_text_pipeline` says so in one line. Never a folder that loads and draws wrong images, or fails to draw.

Unlike the other modules of this package, this one is not copied into model folders (stock folders need no code).
"""

from __future__ import annotations

import os

from diffusers import AutoencoderKL, PixArtTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .noising import is_flow_matching
from .pipeline_latent_text_dit import LatentTextDiTPipeline
from .pipeline_latent_text_to_image import LatentTextToImagePipeline

# Where a text model keeps its own guidance scale: `_guidance_scale` in model_index.json. StableDiffusionPipeline takes
# no such argument (its __call__ defaults to 7.5), and diffusers drops config keys that start with "_" when it loads
# a pipeline, silently, where an unknown key would be warned about; it is diffusers' own form for "a config value
# this class does not take" (`from_pipe` stores such values as `_name`). So the folder stays a stock Stable Diffusion
# folder, any tool reads it as before, and ldm (`loading.guidance_scale_of`) samples at the scale training chose.
# The scheduler or unet config would also carry a key, but a swapped scheduler or a stock loader would warn or drop it.
TEXT_GUIDANCE_KEY = "_guidance_scale"
# A text student's own step count (`ldm distill`), kept as the guidance scale is and for the same reasons. ldm's
# commands sample with it; StableDiffusionPipeline's own __call__ defaults to 50 steps, so diffusers users pass it.
TEXT_STEPS_KEY = "_num_inference_steps"


def stock_export_problem(vae: AutoencoderKL, scheduler: SchedulerMixin | None = None) -> str | None:
    """Why a stock StableDiffusionPipeline folder would draw this model's images wrong or not at all (None: it would
    draw them right)."""
    if scheduler is not None and is_flow_matching(scheduler):
        return (f"it is a flow-matching model, and StableDiffusionPipeline scales its starting noise by the "
                f"scheduler's init_noise_sigma, which {type(scheduler).__name__} does not have")
    if getattr(vae.config, "shift_factor", None):
        return (f"its autoencoder has shift_factor {vae.config.shift_factor:.4f}, which StableDiffusionPipeline never "
                "adds back when decoding")
    if vae.config.latent_channels != 4:
        return f"its autoencoder has {vae.config.latent_channels} latent channels, not Stable Diffusion's 4"
    return None


def make_text_pipeline(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder, tokenizer,
                       scheduler: SchedulerMixin, guidance_scale: float | None = None,
                       num_inference_steps: int | None = None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline without safety checker or feature extractor (`requires_safety_checker: false`:
    a model trained on your own images has no NSFW classifier to run), with the model's guidance scale; ldm's
    LatentTextToImagePipeline where `stock_export_problem` finds one; ldm's LatentTextDiTPipeline for a transformer
    (`unet` a PixArtTransformer2DModel), which no stock pipeline samples as ldm trains it. A consistency student's
    own step count goes with it (`TEXT_STEPS_KEY`)."""
    if isinstance(unet, PixArtTransformer2DModel):
        pipe = LatentTextDiTPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=unet,
                                     scheduler=scheduler, guidance_scale=guidance_scale)
        if num_inference_steps is not None:
            pipe.register_to_config(**{TEXT_STEPS_KEY: int(num_inference_steps)})
        return pipe
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        # Stable Diffusion's schedulers count timesteps from 1 ("leading" spacing: 981, ..., 1); its pipeline
        # rewrites any other offset with a deprecation warning, so give it the one it expects.
        scheduler = type(scheduler).from_config(scheduler.config, steps_offset=1)
    cls = StableDiffusionPipeline if stock_export_problem(vae, scheduler) is None else LatentTextToImagePipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    if guidance_scale is not None:
        pipe.register_to_config(**{TEXT_GUIDANCE_KEY: float(guidance_scale)})
    if num_inference_steps is not None:
        pipe.register_to_config(**{TEXT_STEPS_KEY: int(num_inference_steps)})
    return pipe


def save_text_pipeline(pipe: StableDiffusionPipeline, directory: str | os.PathLike) -> None:
    """`save_pretrained`, plus the tokenizer's vocab.json and merges.txt for BPE tokenizers (CLIP's): transformers 5
    writes only tokenizer.json, and readers of the original CLIP format (older transformers, the slow tokenizer,
    other tool chains) need the two files."""
    problem = stock_export_problem(pipe.vae, pipe.scheduler)
    if problem is not None and isinstance(pipe, StableDiffusionPipeline):  # not a transformer's LatentTextDiTPipeline
        print(f"text model saved as ldm's LatentTextToImagePipeline, not a stock StableDiffusionPipeline: {problem} "
              "(load it with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True))")
    pipe.save_pretrained(directory)
    backend = getattr(pipe.tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        backend.model.save(os.path.join(directory, "tokenizer"))
