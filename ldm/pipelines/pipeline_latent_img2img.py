"""LatentImg2ImgPipeline: SDEdit (Meng et al. 2022) on a trained latent diffusion model, unconditional or class-guided.

Copied with its siblings into every saved model folder; imports only torch, diffusers, numpy/PIL and siblings.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .guidance import ClassLabels
from .image_inputs import ImageInput, check_strength, preprocess_image
from .latents import encode
from .noising import initial_noise_scale, noise_latents
from .pipeline_common import LatentPipelineMixin


def img2img_timesteps(scheduler, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The last ``int(num_inference_steps * strength)`` timesteps of the scheduler, as StableDiffusionImg2ImgPipeline
    takes them (call after `set_timesteps`); empty at strength 0."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)  # sigma-indexed schedulers start at this index
    return scheduler.timesteps[t_start * scheduler.order:]


class LatentImg2ImgPipeline(LatentPipelineMixin, DiffusionPipeline):
    r"""
    Image-to-image generation (SDEdit) with a latent diffusion model: change the style of an image, or, with a
    class-conditional model, turn it towards another class (a 3 into an 8).

    1. encode the image to latents z0 (posterior mean, scaled: `latents.encode`);
    2. noise them to the level of the first of the last ``strength * num_inference_steps`` timesteps with the
       scheduler's own forward process (`add_noise`; a flow model's `scale_noise`, x_σ = (1 − σ)·z0 + σ·ε, at that
       step's σ) (strength 1: pure noise, exactly as sampling starts);
    3. denoise over those timesteps with any scheduler (class models: classifier-free guidance);
    4. decode. Strength 0 runs no step and returns the VAE reconstruction of the image.

    It shares every component with `LatentDiffusionPipeline`, so one saved model does both:
    ``LatentImg2ImgPipeline.from_pipe(sampling_pipe)``, ``LatentImg2ImgPipeline.from_pretrained(folder)``, or
    without ldm ``DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_latent_img2img",
    trust_remote_code=True)``.

    Parameters:
        vae ([`AutoencoderKL`]): encodes the image and decodes the result.
        unet ([`UNet2DModel`]): the latent denoiser (optionally with class embeddings, the last being the null class).
        transformer ([`DiTTransformer2DModel`], *optional*): a DiT in place of the UNet (exactly one of the two).
        scheduler ([`SchedulerMixin`]): any diffusers scheduler (DDIM, DDPM, DPM-Solver++, UniPC, Euler, ...; a flow
            model's FlowMatchEuler or FlowMatchHeun).
        class_names (`List[str]`, *optional*): names of the classes of a class-conditional UNet, in id order.
        guidance_scale (`float`, *optional*): a class model's own guidance scale, used when a call gives none.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
    >>> from ldm.pipelines import LatentImg2ImgPipeline

    >>> vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    ...                     up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
    ...                     sample_size=16)
    >>> unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
    ...                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    >>> pipe = LatentImg2ImgPipeline(vae=vae, unet=unet, scheduler=DDIMScheduler())
    >>> image = torch.rand(1, 3, 16, 16)  # [0, 1], or PIL images
    >>> out = pipe(image=image, strength=0.6, num_inference_steps=10, generator=torch.Generator().manual_seed(0))
    >>> out.images[0].size
    (16, 16)
    ```
    """

    model_cpu_offload_seq = "vae->unet->transformer->vae"

    def __init__(self, vae: AutoencoderKL, scheduler: SchedulerMixin, unet: UNet2DModel | None = None,
                 transformer: DiTTransformer2DModel | None = None, class_names: list[str] | None = None,
                 guidance_scale: float | None = None, num_classes: int | None = None):
        super().__init__()
        self.register_denoiser(vae, scheduler, unet, transformer, class_names, guidance_scale, num_classes)

    def image_size(self) -> tuple[int, int]:
        size = self.vae.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput = None,
        strength: float = 0.8,
        class_labels: ClassLabels | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            image (`PIL.Image.Image`, `List[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
                The images to edit, at the model's resolution and number of channels; values in [0, 1].
            strength (`float`, *optional*, defaults to 0.8):
                How much of the diffusion to run, in [0, 1]: 0 returns the (VAE-reconstructed) image, 1 ignores it
                and samples from noise.
            class_labels (`int`, `str`, `List[int | str]`, `torch.Tensor` or `np.ndarray` of ints, *optional*):
                Class-conditional models only (required there): the class to guide each image towards.
            guidance_scale (`float`, *optional*, defaults to the model's own, `pipe.default_guidance_scale`):
                Classifier-free guidance scale; unconditional models take none.
            num_inference_steps (`int`, *optional*, defaults to 50):
                Denoising steps of a full run; ``int(strength * num_inference_steps)`` of them are run.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*):
                Makes the noise deterministic; a list gives one generator per image.
            eta (`float`, *optional*, defaults to 0.0):
                DDIM's η; ignored by other schedulers.
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"`, `"np"` (NHWC in [0, 1]) or `"pt"`.
            return_dict (`bool`, *optional*, defaults to `True`): an [`ImagePipelineOutput`] or a tuple.

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the edited images.
        """
        # 0. Check every argument before any work
        self.check_output_type(output_type)
        strength = check_strength(strength)
        self.check_numbers(None, num_inference_steps, eta, guidance_scale)
        pixels = preprocess_image(image, "image", self.vae.config.in_channels, self.image_size())
        batch_size, label_ids, guidance_scale = self.check_inputs(pixels.shape[0], class_labels, guidance_scale)
        device = self._execution_device
        labels = None if label_ids is None else torch.tensor(label_ids, dtype=torch.long, device=device)

        # 1. Encode: z0 = scaling_factor * mean of q(z | x)
        z0 = encode(self.vae, 2 * pixels.to(device) - 1, sample=False).to(self.denoiser.dtype)

        # 2. Timesteps: the last strength * n of them
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = img2img_timesteps(self.scheduler, num_inference_steps, strength)

        # 3. Noise z0 to the first of them (strength 1: pure noise, scaled as sampling from noise starts)
        latents = z0
        if len(timesteps):
            noise = randn_tensor(z0.shape, generator=generator, device=device, dtype=z0.dtype)
            if strength == 1.0:
                latents = noise * initial_noise_scale(self.scheduler)
            else:
                latents = noise_latents(self.scheduler, z0, noise, timesteps[:1].repeat(batch_size))

        # 4. Denoise x_t -> x_t-1 over them
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        for t in self.progress_bar(timesteps):
            model_output = self.predict_noise(latents, t, labels, guidance_scale)
            latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample

        # 5. Decode
        image = self.to_output(self.decode_latents(latents), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
