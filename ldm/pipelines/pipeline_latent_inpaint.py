"""LatentInpaintPipeline: fill masked regions with any trained latent diffusion model, no retraining (RePaint on
latents). Copied with its siblings into every saved model folder; imports only torch, diffusers and siblings.
"""

from __future__ import annotations

import itertools

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .guidance import ClassLabels
from .image_inputs import ImageInput, mask_to_latent_grid, preprocess_image, preprocess_mask
from .latents import encode
from .noising import initial_noise_scale, noise_latents
from .pipeline_common import LatentPipelineMixin
from .repaint import check_jumps, renoise, repaint_positions, rewind, supports_resampling


class LatentInpaintPipeline(LatentPipelineMixin, DiffusionPipeline):
    r"""
    Inpainting with a latent diffusion model trained only to generate: RePaint (Lugmayr et al. 2022) in latent space.

    1. encode the image to latents z0 (posterior mean) and reduce the mask to the latent grid: a latent cell is
       filled if any pixel of its patch is masked (`image_inputs.mask_to_latent_grid`);
    2. start from noise; after every denoising step (any first-order scheduler) re-impose the known cells, z0 noised
       to the step's level by the scheduler's forward process (`add_noise`, or a flow model's `scale_noise`; clean
       z0 after the last step);
    3. RePaint's resampling: every `jump_length` steps jump back `jump_length` steps by the forward process,
       `jump_n_sample - 1` times, so the generated and the known regions agree across the seam (`repaint.py`;
       needs a scheduler whose step depends only on the timestep: DDPM or DDIM, or a flow model's FlowMatchEuler);
    4. decode, and paste the unmasked pixels of the input back (`paste_back`, default on): nothing outside the
       mask changes, not even by the autoencoder's reconstruction error.

    Masks follow diffusers' inpainting pipelines: white (1) = fill, black (0) = keep, at image resolution.
    Loads from any ldm sampling folder: ``LatentInpaintPipeline.from_pretrained(folder)``, ``from_pipe(pipe)``, or
    ``DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_latent_inpaint", trust_remote_code=True)``.

    Parameters:
        vae ([`AutoencoderKL`]): encodes the image and decodes the result.
        unet ([`UNet2DModel`]): the latent denoiser (optionally class-conditional).
        transformer ([`DiTTransformer2DModel`], *optional*): a DiT in place of the UNet (exactly one of the two).
        scheduler ([`SchedulerMixin`]): any first-order diffusers scheduler; resampling needs DDPM or DDIM (flow
            models: FlowMatchEuler, the one they are saved with).
        class_names (`List[str]`, *optional*): names of the classes of a class-conditional UNet, in id order.
        guidance_scale (`float`, *optional*): a class model's own guidance scale, used when a call gives none.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
    >>> from ldm.pipelines import LatentInpaintPipeline

    >>> vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    ...                     up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
    ...                     sample_size=16)
    >>> unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
    ...                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    >>> pipe = LatentInpaintPipeline(vae=vae, unet=unet, scheduler=DDIMScheduler())
    >>> image, mask = torch.rand(1, 3, 16, 16), torch.zeros(1, 1, 16, 16)
    >>> mask[..., 4:12, 4:12] = 1  # fill the centre
    >>> out = pipe(image=image, mask_image=mask, num_inference_steps=10, jump_length=2, jump_n_sample=2,
    ...            output_type="pt")
    >>> bool((out.images[..., :4, :] == image[..., :4, :]).all())  # pasted back
    True
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

    def check_resampling(self, num_inference_steps: int, jump_length: int, jump_n_sample: int) -> None:
        if self.scheduler.order != 1:
            # The schedule's positions are inference steps, one model call each; a second-order scheduler takes two
            # calls per step and its timesteps list has 2n - 1 entries, which the positions would mis-address.
            raise ValueError(f"scheduler: inpainting steps one model call per timestep, and "
                             f"{type(self.scheduler).__name__} is of order {self.scheduler.order}; use a first-order "
                             "scheduler (flow models: FlowMatchEulerDiscreteScheduler, `--scheduler flow-euler`)")
        for name, value in (("num_inference_steps", num_inference_steps), ("jump_length", jump_length),
                            ("jump_n_sample", jump_n_sample)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if jump_n_sample > 1 and not supports_resampling(self.scheduler):
            raise ValueError(
                f"jump_n_sample: resampling jumps back in time, which {type(self.scheduler).__name__} cannot (it "
                "keeps a step counter and past outputs); use DDIMScheduler or DDPMScheduler (flow models: "
                "FlowMatchEulerDiscreteScheduler), or jump_n_sample=1")
        check_jumps(num_inference_steps, jump_length, jump_n_sample)

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput = None,
        mask_image: ImageInput = None,
        class_labels: ClassLabels | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int = 50,
        jump_length: int = 10,
        jump_n_sample: int = 1,
        paste_back: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            image (`PIL.Image.Image`, `List[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
                The images to repair, at the model's resolution and number of channels; values in [0, 1].
            mask_image (same types as `image`, one channel):
                White (1) marks the pixels to fill, black (0) the pixels to keep; one mask per image or one for all.
                Neither empty nor all white.
            class_labels, guidance_scale:
                Class-conditional models only: the class to fill in with, and the classifier-free guidance scale
                (default: the model's own, `pipe.default_guidance_scale`).
            num_inference_steps (`int`, *optional*, defaults to 50): denoising steps (without the resampling ones).
            jump_length (`int`, *optional*, defaults to 10): RePaint's jump length, in inference steps.
            jump_n_sample (`int`, *optional*, defaults to 1): RePaint's resampling count; 1 = no resampling.
                Each extra sample adds about (jump_n_sample - 1) x num_inference_steps model calls.
            paste_back (`bool`, *optional*, defaults to `True`): copy the unmasked input pixels into the result.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): makes the noise deterministic.
            eta (`float`, *optional*, defaults to 0.0): DDIM's η; ignored by other schedulers.
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"`, `"np"` (NHWC in [0, 1]) or `"pt"`.
            return_dict (`bool`, *optional*, defaults to `True`): an [`ImagePipelineOutput`] or a tuple.

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the completed images.
        """
        # 0. Check every argument before any work
        self.check_output_type(output_type)
        self.check_numbers(None, num_inference_steps, eta, guidance_scale)
        pixels = preprocess_image(image, "image", self.vae.config.in_channels, self.image_size())
        mask = preprocess_mask(mask_image, pixels.shape[0], self.image_size())
        batch_size, label_ids, guidance_scale = self.check_inputs(pixels.shape[0], class_labels, guidance_scale)
        self.check_resampling(num_inference_steps, jump_length, jump_n_sample)
        device = self._execution_device
        labels = None if label_ids is None else torch.tensor(label_ids, dtype=torch.long, device=device)
        pixels, mask = pixels.to(device), mask.to(device)

        # 1. Known latents and the latent mask (1: generate, 0: known)
        z0 = encode(self.vae, 2 * pixels - 1, sample=False).to(self.denoiser.dtype)
        latent_mask = mask_to_latent_grid(mask, tuple(z0.shape[-2:])).to(z0.dtype)

        def impose_known(latents: torch.Tensor, position: int) -> torch.Tensor:
            if position >= len(timesteps):
                known = z0
            else:
                noise = randn_tensor(z0.shape, generator=generator, device=device, dtype=z0.dtype)
                known = noise_latents(self.scheduler, z0, noise, timesteps[position:position + 1].repeat(batch_size))
            return latent_mask * latents + (1 - latent_mask) * known

        # 2. Start from noise at the first timestep, known cells noised to the same level
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = randn_tensor(z0.shape, generator=generator, device=device, dtype=z0.dtype)
        latents = impose_known(latents * initial_noise_scale(self.scheduler), 0)

        # 3. Walk RePaint's schedule: down = one scheduler step then re-impose; up = re-noise (resampling)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        positions = repaint_positions(num_inference_steps, jump_length, jump_n_sample)
        for here, there in self.progress_bar(list(itertools.pairwise(positions))):
            if there == here + 1:
                t = timesteps[here]
                model_output = self.predict_noise(latents, t, labels, guidance_scale)
                latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample
                latents = impose_known(latents, there)
            else:
                latents = renoise(self.scheduler, latents, there, here, generator)
                rewind(self.scheduler, there, num_inference_steps, device)  # a step-indexed scheduler steps from there

        # 4. Decode; paste the kept pixels back (exactly: where the mask is 0 the output IS the input)
        image = self.decode_latents(latents)
        if paste_back:
            image = torch.where(mask.bool(), image, pixels.to(image.dtype))
        image = self.to_output(image, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
