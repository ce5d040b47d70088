"""LatentTextToImagePipeline: Stable Diffusion's text-to-image sampling, decoded with the autoencoder's shift.

A text model is saved as a stock `StableDiffusionPipeline` folder whenever that draws the right images
(`text_to_image.py`). `StableDiffusionPipeline` decodes ``D(z / scaling_factor)`` and never adds
``vae.config.shift_factor`` back, so on an autoencoder with a shift (SD3/FLUX-style, or one whose latents' measured
mean was stored, `ldm.pretrained_vae`) it would load and draw wrong images; such models, and any with other than 4
latent channels, are saved with this class instead. It is `StableDiffusionPipeline` in everything (prompt encoding,
classifier-free guidance, schedulers, callbacks) except the last step, which goes through `latents.decode`.

This file imports only torch, diffusers and its siblings: it is copied into every saved model folder.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from .guidance import ClassLabels  # noqa: F401  (diffusers' remote-code loader copies only direct relative imports)
from .latents import decode
from .pipeline_common import SavedWithCodeMixin


class LatentTextToImagePipeline(SavedWithCodeMixin, StableDiffusionPipeline):
    r"""Text-to-image latent diffusion whose autoencoder has a `shift_factor` (or not 4 latent channels).

    Components and arguments are `StableDiffusionPipeline`'s (no safety checker). Steps:

    1. encode the prompt (and the empty prompt, for classifier-free guidance) with the text encoder;
    2. denoise random latents with the UNet and the scheduler (Stable Diffusion's loop, `output_type="latent"`);
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
