"""diffusers pipelines of ldm, one file per task (diffusers' `pipelines/<family>/pipeline_<task>.py` layout).

Each pipeline module imports only torch, diffusers, numpy/PIL, the standard library and its sibling files
(`.latents`): `save_pretrained` copies it into the model folder, so that `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)` runs it where ldm is not installed.
"""

from .pipeline_latent_diffusion import LatentDiffusionPipeline

__all__ = ["LatentDiffusionPipeline"]
