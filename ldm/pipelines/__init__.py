"""diffusers pipelines of ldm, one file per task (diffusers' `pipelines/<family>/pipeline_<task>.py` layout).

Each pipeline module imports only torch, diffusers, numpy/PIL, the standard library and its sibling files
(`.latents`, `.guidance`): `save_pretrained` copies it into the model folder, so that
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` runs it where ldm is not installed.

  pipeline_latent_diffusion.py  LatentDiffusionPipeline: unconditional and class-conditional sampling
  pipeline_latent_img2img.py    LatentImg2ImgPipeline: SDEdit image-to-image (style, class-guided edits)
  pipeline_latent_inpaint.py    LatentInpaintPipeline: inpainting with RePaint on latents (repaint.py)
  pipeline_latent_superres.py   LatentSuperResolutionPipeline: LDM-SR, low-res image concatenated with the latents
  pipeline_latent_text_to_image.py  LatentTextToImagePipeline: text models whose autoencoder has a shift or not 4
                                latent channels (StableDiffusionPipeline would decode them wrong), and flow-matching
                                text models (StableDiffusionPipeline needs the scheduler's init_noise_sigma)
  pipeline_latent_text_dit.py   LatentTextDiTPipeline: text models whose denoiser is a transformer (PixArt-α's)
  pipeline_common.py            what they share: conditioning, either backbone's model call (`unet` or a DiT as
                                `transformer`), decoding, saving with the code (a class DiT as a stock DiTPipeline
                                folder where it can be)
  image_inputs.py               image, mask and strength arguments, checked before any work
  noising.py                    the forward process of DDPM-family and flow-matching schedulers alike
  repaint.py                    RePaint's resampling schedule and its jump back up (both families)
  latents.py                    encode/decode and the scaling factor, in one place
  guidance.py                   class labels and classifier-free guidance
  text_to_image.py              text models are stock StableDiffusionPipelines where they can be (not copied)
  loading.py                    load/save whichever kind a folder holds (not copied)
"""

from .pipeline_latent_diffusion import LatentDiffusionPipeline
from .pipeline_latent_img2img import LatentImg2ImgPipeline
from .pipeline_latent_inpaint import LatentInpaintPipeline
from .pipeline_latent_superres import LatentSuperResolutionPipeline

__all__ = ["LatentDiffusionPipeline", "LatentImg2ImgPipeline", "LatentInpaintPipeline", "LatentSuperResolutionPipeline"]
