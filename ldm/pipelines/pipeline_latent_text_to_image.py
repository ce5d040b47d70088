"""LatentTextToImagePipeline: Stable Diffusion's text-to-image sampling, decoded with the autoencoder's shift.

A text model is saved as a stock `StableDiffusionPipeline` folder whenever that draws the right images
(`text_to_image.py`). `StableDiffusionPipeline` decodes ``D(z / scaling_factor)`` and never adds
``vae.config.shift_factor`` back, so on an autoencoder with a shift (SD3/FLUX-style, or one whose latents' measured
mean was stored, `ldm.pretrained_vae`) it would load and draw wrong images; and it scales its starting noise by
``scheduler.init_noise_sigma``, which flow-matching schedulers lack. Such models, and any with other than 4 latent
channels, are saved with this class instead. It is `StableDiffusionPipeline` in everything (prompt encoding,
classifier-free guidance, schedulers, callbacks) except the starting noise (`noising.initial_noise_scale`) and the
last step, which goes through `latents.decode`.

This file imports only torch, diffusers and its siblings: it is copied into every saved model folder.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .guidance import ClassLabels  # noqa: F401  (diffusers' remote-code loader copies only direct relative imports)
from .latents import decode
from .noising import initial_noise_scale
from .pipeline_common import SavedWithCodeMixin


class LatentTextToImagePipeline(SavedWithCodeMixin, StableDiffusionPipeline):
    r"""Text-to-image latent diffusion whose autoencoder has a `shift_factor` (or not 4 latent channels), or whose
    scheduler is flow-matching.

    Components and arguments are `StableDiffusionPipeline`'s (no safety checker). Steps:

    1. encode the prompt (and the empty prompt, for classifier-free guidance) with the text encoder;
    2. denoise random latents (std `init_noise_sigma`, 1 for a flow-matching scheduler) with the UNet and the
       scheduler (Stable Diffusion's loop, `output_type="latent"`);
    3. decode ``x = D(latents / scaling_factor + shift_factor)`` (`latents.decode`) and convert to the output type.

    Example (a folder that training wrote):

    ```py
    >>> from diffusers import DiffusionPipeline
    >>> pipe = DiffusionPipeline.from_pretrained("runs/my-text-model/pipeline", trust_remote_code=True)  # doctest: +SKIP
    >>> images = pipe(["a photo"], num_inference_steps=50).images  # doctest: +SKIP
    ```
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                         safety_checker=None, feature_extractor=None, image_encoder=None,
                         requires_safety_checker=False)

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator,
                        latents=None):
        # StableDiffusionPipeline's own, but scaled by `initial_noise_scale`: its `self.scheduler.init_noise_sigma`
        # fails on flow-matching schedulers, which start from x_1 = ε.
        shape = (batch_size, num_channels_latents, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size}; pass one per image.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device) * initial_noise_scale(self.scheduler)

    @torch.no_grad()
    def __call__(self, *args, output_type: str | None = "pil", return_dict: bool = True, **kwargs):
        # 1.-2. Stable Diffusion's own steps, stopped before its decode (which would leave out the shift).
        latents = StableDiffusionPipeline.__call__(self, *args, output_type="latent", return_dict=True,
                                                   **kwargs).images
        if output_type == "latent":
            images = latents
        else:
            # 3. x = D(z / scaling_factor + shift_factor), then [-1, 1] -> the output type.
            images = decode(self.vae, latents)
            images = self.image_processor.postprocess(images, output_type=output_type,
                                                      do_denormalize=[True] * images.shape[0])
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, None
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
