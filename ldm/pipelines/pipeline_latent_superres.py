"""LatentSuperResolutionPipeline: LDM-SR (Rombach et al. 2022, Sec. 4.4) with a KL autoencoder.

Copied with its siblings into every saved model folder; imports only torch, diffusers, numpy/PIL and siblings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .guidance import combine_guidance  # noqa: F401  (diffusers' remote-code loader copies only direct
from .image_inputs import ImageInput, preprocess_image
from .latents import decode  # noqa: F401  relative imports: pipeline_common's siblings are named here)
from .noising import initial_noise_scale, scale_model_input
from .pipeline_common import LatentPipelineMixin


def low_res_to_latent_grid(low_res: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The UNet's conditioning input: the low-resolution image in [-1, 1], bicubically resized to the latent grid
    (identity when the super-resolution factor equals the autoencoder's). Training and sampling both call this."""
    if tuple(low_res.shape[-2:]) == tuple(latent_size):
        return low_res
    return F.interpolate(low_res, size=latent_size, mode="bicubic", align_corners=False)


class LatentSuperResolutionPipeline(LatentPipelineMixin, DiffusionPipeline):
    r"""
    Super-resolution with latent diffusion (LDM-SR): the UNet denoises the latents of the high-resolution image
    given the low-resolution image, concatenated with the latents along the channels, so it models p(z | low-res).

    1. the low-resolution image (`low_res_size`², the model's channels) -> [-1, 1], resized to the latent grid;
    2. start from noise; at every step the UNet sees [scaled latents, low-res] (any scheduler);
    3. decode the latents to the high-resolution image.

    Parameters:
        vae ([`AutoencoderKL`]): decodes the latents (its `scaling_factor` is applied, see `latents.decode`).
        unet ([`UNet2DModel`]): in_channels = latent channels + image channels, out_channels = latent channels.
        transformer ([`DiTTransformer2DModel`], *optional*): a DiT in place of the UNet, with the same channels.
        scheduler ([`SchedulerMixin`]): any diffusers scheduler (flow models: FlowMatchEuler or FlowMatchHeun).
        low_res_size (`int`): the side of the low-resolution images the model was trained on.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
    >>> from ldm.pipelines import LatentSuperResolutionPipeline

    >>> vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    ...                     up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
    ...                     sample_size=16)
    >>> unet = UNet2DModel(sample_size=8, in_channels=4 + 3, out_channels=4, block_out_channels=(32, 32),
    ...                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    >>> pipe = LatentSuperResolutionPipeline(vae=vae, unet=unet, scheduler=DDIMScheduler(), low_res_size=8)
    >>> low_res = torch.rand(2, 3, 8, 8)  # [0, 1], or PIL images
    >>> pipe(image=low_res, num_inference_steps=10).images[0].size
    (16, 16)
    ```
    """

    model_cpu_offload_seq = "unet->transformer->vae"

    def __init__(self, vae: AutoencoderKL, scheduler: SchedulerMixin, unet: UNet2DModel | None = None,
                 transformer: DiTTransformer2DModel | None = None, low_res_size: int = 0):
        super().__init__()
        self.register_denoiser(vae, scheduler, unet, transformer)
        self.register_to_config(low_res_size=int(low_res_size))

    def check_superres_model(self) -> None:
        expected = self.vae.config.latent_channels + self.vae.config.in_channels
        if not self.is_superres_model:
            raise ValueError("image: this model was not trained for super-resolution (its UNet takes the latents "
                             "alone); train one with denoiser.task=superres, or use LatentImg2ImgPipeline to edit")
        if self.denoiser.config.in_channels != expected or self.config.low_res_size <= 0:
            raise ValueError(f"unet: in_channels={self.denoiser.config.in_channels} and low_res_size="
                             f"{self.config.low_res_size} do not describe a super-resolution model of this "
                             f"autoencoder ({expected} channels and a positive size expected)")

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        output_type: str | None = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            image (`PIL.Image.Image`, `List[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
                The low-resolution images, `low_res_size` x `low_res_size`, the model's channels, values in [0, 1].
            num_inference_steps (`int`, *optional*, defaults to 50): denoising steps.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): makes the noise deterministic.
            eta (`float`, *optional*, defaults to 0.0): DDIM's η; ignored by other schedulers.
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"`, `"np"` (NHWC in [0, 1]) or `"pt"`.
            return_dict (`bool`, *optional*, defaults to `True`): an [`ImagePipelineOutput`] or a tuple.
            latents (`torch.Tensor`, *optional*): unit-variance starting noise instead of drawing it.

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the high-resolution images.
        """
        # 0. Check every argument before any work
        self.check_output_type(output_type)
        self.check_numbers(None, num_inference_steps, eta, None)
        self.check_superres_model()
        size = self.config.low_res_size
        low_res = preprocess_image(image, "image", self.vae.config.in_channels, (size, size))
        device = self._execution_device
        sample_size = self.denoiser.config.sample_size
        latent_size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        shape = (low_res.shape[0], self.vae.config.latent_channels, *latent_size)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents: shape {tuple(latents.shape)}, expected {shape}")

        # 1. The condition: low-res in [-1, 1] on the latent grid
        condition = low_res_to_latent_grid(2 * low_res.to(device, self.denoiser.dtype) - 1, latent_size)

        # 2. Timesteps first, then the noise x_T scaled for them (Euler's init_noise_sigma depends on the timesteps set;
        #    flow matching starts from x_1 = ε)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.denoiser.dtype)
        latents = latents.to(device, self.denoiser.dtype) * initial_noise_scale(self.scheduler)

        # 3. Denoise with [scaled x_t, low-res] as the UNet's input (the condition is not scaled, as in diffusers'
        #    StableDiffusionUpscalePipeline)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([scale_model_input(self.scheduler, latents, t), condition], dim=1)
            model_output = self.model_output(model_input, t)
            latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample

        # 4. Decode
        image = self.to_output(self.decode_latents(latents), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
