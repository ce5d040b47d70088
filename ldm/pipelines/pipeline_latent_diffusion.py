"""LatentDiffusionPipeline: unconditional or class-conditional sampling with a KL autoencoder and a latent UNet.

This module is copied, together with its sibling files (`pipeline_common.MODULE_FILES`), into every saved model
folder, so that
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` works where only torch and diffusers are
installed. It must therefore import only torch, diffusers, numpy/PIL, the standard library and its sibling files.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .guidance import ClassLabels
from .latents import decode  # noqa: F401  (diffusers' remote-code loader copies only direct relative imports)
from .noising import initial_noise_scale, set_timesteps
from .pipeline_common import DEFAULT_GUIDANCE_SCALE, LatentPipelineMixin

__all__ = ["DEFAULT_GUIDANCE_SCALE", "LatentDiffusionPipeline"]


class LatentDiffusionPipeline(LatentPipelineMixin, DiffusionPipeline):
    r"""
    Pipeline for unconditional or class-conditional image generation with latent diffusion (Rombach et al. 2022).

    The UNet denoises latents of the KL autoencoder; the scheduler owns the noise math; the VAE decodes the final
    latents (``latents / vae.config.scaling_factor``, see `latents.decode`). A UNet with class embeddings
    (`num_class_embeds` = classes + 1, the last being the null class) makes the pipeline class-conditional: it then
    takes `class_labels` and samples with classifier-free guidance (`guidance_scale`, see `guidance.py`).

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    Parameters:
        vae ([`AutoencoderKL`]):
            KL-regularised autoencoder that decodes latents to images.
        unet ([`UNet2DModel`], *optional*):
            A `UNet2DModel` that predicts the noise (or v / x0, as its scheduler's `prediction_type` says) of the
            latents.
        transformer ([`DiTTransformer2DModel`], *optional*):
            A DiT instead of the UNet (diffusers' component name for it, as in `DiTPipeline`); exactly one of the two.
            It always takes a class: an unconditional DiT has one (id 0), a class DiT `num_classes` of its
            `num_embeds_ada_norm` embeddings, the null class being `num_embeds_ada_norm` (1000 for one saved for
            diffusers' `DiTPipeline`, which then loads the same folder and draws the same images).
        scheduler ([`SchedulerMixin`]):
            Any diffusers scheduler, e.g. [`DDPMScheduler`], [`DDIMScheduler`], [`DPMSolverMultistepScheduler`],
            [`EulerDiscreteScheduler`] or [`UniPCMultistepScheduler`]; for a flow-matching model (trained with
            `diffusion.objective: flow`, the UNet predicts the velocity ε − x) [`FlowMatchEulerDiscreteScheduler`] or
            [`FlowMatchHeunDiscreteScheduler`] (`noising.py`).
        class_names (`List[str]`, *optional*):
            Names of the classes of a class-conditional UNet, in id order; saved in model_index.json, so that
            `class_labels` may name them.
        guidance_scale (`float`, *optional*):
            A class-conditional model's own classifier-free guidance scale (training's `denoiser.guidance_scale`), saved
            in model_index.json and used when a call gives none; without it, `DEFAULT_GUIDANCE_SCALE`.
        num_classes (`int`, *optional*):
            A class-conditional transformer's number of classes (a UNet's is its `num_class_embeds` less one).
        num_inference_steps (`int`, *optional*):
            The model's own step count, saved in model_index.json and used when a call gives none: a consistency
            student's (`ldm distill`, sampled by [`LCMScheduler`]); without it, 50.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
    >>> from ldm.pipelines import LatentDiffusionPipeline

    >>> vae = AutoencoderKL(
    ...     block_out_channels=(32, 64),
    ...     down_block_types=("DownEncoderBlock2D",) * 2,
    ...     up_block_types=("UpDecoderBlock2D",) * 2,
    ...     latent_channels=4,
    ...     sample_size=16,
    ... )
    >>> unet = UNet2DModel(
    ...     sample_size=8,
    ...     in_channels=4,
    ...     out_channels=4,
    ...     block_out_channels=(32, 64),
    ...     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    ...     up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ... )
    >>> pipe = LatentDiffusionPipeline(vae=vae, unet=unet, scheduler=DDIMScheduler())
    >>> images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images
    >>> images[0].size
    (16, 16)
    >>> pipe.save_pretrained("my-ldm")  # writes pipeline_latent_diffusion.py and latents.py beside the weights
    >>> pipe = LatentDiffusionPipeline.from_pretrained("my-ldm")  # or, without ldm installed:
    >>> # DiffusionPipeline.from_pretrained("my-ldm", trust_remote_code=True)

    >>> # Class-conditional: one extra class embedding for the null class of classifier-free guidance
    >>> unet = UNet2DModel(
    ...     sample_size=8,
    ...     in_channels=4,
    ...     out_channels=4,
    ...     block_out_channels=(32, 64),
    ...     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    ...     up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ...     num_class_embeds=3 + 1,
    ... )
    >>> pipe = LatentDiffusionPipeline(vae=vae, unet=unet, scheduler=DDIMScheduler(), class_names=["cat", "dog", "fox"])
    >>> images = pipe(class_labels=["dog", 2], guidance_scale=3.0, num_inference_steps=5).images
    >>> len(images)
    2
    ```
    """

    model_cpu_offload_seq = "unet->transformer->vae"
    _callback_tensor_inputs = ("latents",)  # what callback_on_step_end may ask for

    def __init__(self, vae: AutoencoderKL, scheduler: SchedulerMixin, unet: UNet2DModel | None = None,
                 transformer: DiTTransformer2DModel | None = None, class_names: list[str] | None = None,
                 guidance_scale: float | None = None, num_classes: int | None = None,
                 num_inference_steps: int | None = None):
        super().__init__()
        self.register_denoiser(vae, scheduler, unet, transformer, class_names, guidance_scale, num_classes)
        self.register_num_inference_steps(num_inference_steps)

    def prepare_latents(
        self,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sample_size = self.denoiser.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        shape = (batch_size, self.denoiser.config.in_channels, height, width)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size}; pass one per image.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.denoiser.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        else:
            latents = latents.to(device=device, dtype=self.denoiser.dtype)
        # scale the initial noise by the standard deviation required by the scheduler (1 for DDPM/DDIM and flow
        # matching, σ_max for Euler)
        return latents * initial_noise_scale(self.scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        class_labels: ClassLabels | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        output_type: str | None = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        The call function to the pipeline for generation.

        Args:
            batch_size (`int`, *optional*):
                Number of images to generate; defaults to 1, or to the number of `class_labels`.
            class_labels (`int`, `str`, `List[int | str]`, `torch.Tensor` or `np.ndarray` of ints, *optional*):
                Class-conditional models only (required there): the class of each image, as an id or a name from
                `class_names`; a single label is used for the whole batch.
            guidance_scale (`float`, *optional*, defaults to the model's own, `pipe.default_guidance_scale`):
                Classifier-free guidance scale s: ε(∅) + s (ε(c) − ε(∅)). 1 samples the conditional model alone
                (one forward pass per step); other values run the conditional and unconditional branches as one
                batched pass. Unconditional models take no guidance_scale.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*):
                A [`torch.Generator`](https://pytorch.org/docs/stable/generated/torch.Generator.html) to make
                generation deterministic; a list of `batch_size` generators makes each image depend only on its own.
            num_inference_steps (`int`, *optional*, defaults to the model's own, `pipe.default_num_inference_steps`):
                The number of denoising steps. More denoising steps usually lead to a higher quality image at the
                expense of slower inference. A consistency student has its own (e.g. 4); other models default to 50.
            eta (`float`, *optional*, defaults to 0.0):
                Corresponds to parameter eta (η) from the [DDIM](https://arxiv.org/abs/2010.02502) paper. Only applies
                to [`~schedulers.DDIMScheduler`], and is ignored in other schedulers.
            output_type (`str`, *optional*, defaults to `"pil"`):
                The output format of the generated images: `"pil"` (`PIL.Image`, mode "L" for one channel), `"np"`
                (`np.ndarray` NHWC float in [0, 1]) or `"pt"` (`torch.Tensor` NCHW in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether or not to return a [`~pipelines.ImagePipelineOutput`] instead of a plain tuple.
            latents (`torch.Tensor`, *optional*):
                Pre-generated unit-variance noise latents of shape (batch_size, C, h, w), used instead of sampling
                them with `generator`.
            callback_on_step_end (`Callable`, *optional*):
                Called at the end of each denoising step as `callback_on_step_end(self, step, timestep,
                callback_kwargs)`, as in diffusers' Stable Diffusion pipelines (progress bars, cancelling by raising,
                editing latents); `callback_kwargs` holds the tensors named in
                `callback_on_step_end_tensor_inputs`, and a `"latents"` entry in the returned dict replaces the
                latents.
            callback_on_step_end_tensor_inputs (`List[str]`, *optional*, defaults to `["latents"]`):
                The tensors passed to `callback_on_step_end`; only names in `._callback_tensor_inputs`.

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`:
                If `return_dict` is `True`, [`~pipelines.ImagePipelineOutput`] is returned, otherwise a `tuple` is
                returned where the first element is a list with the generated images
        """
        self.check_output_type(output_type)
        if num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps
        self.check_numbers(batch_size, num_inference_steps, eta, guidance_scale)
        batch_size, label_ids, guidance_scale = self.check_inputs(batch_size, class_labels, guidance_scale)
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = self._callback_tensor_inputs
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} are not among "
                             f"{self._callback_tensor_inputs}")
        device = self._execution_device

        # 1. Set the timesteps of the sampler first: the initial noise scale of σ-based schedulers (Euler) is the
        #    first σ of these timesteps, which is below the training σ_max unless the first step is at t = T-1
        set_timesteps(self.scheduler, num_inference_steps, device)  # a student's grid: noising.consistency_grid
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 2. Sample Gaussian noise x_T in latent space, scaled for the scheduler
        latents = self.prepare_latents(batch_size, generator, device, latents)
        labels = None if label_ids is None else torch.tensor(label_ids, dtype=torch.long, device=device)

        # 3. Denoise: x_t -> x_t-1 for each timestep
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            # 3.1 predict the noise residual (or v / x0), guided for class-conditional models
            model_output = self.predict_noise(latents, t, labels, guidance_scale)
            # 3.2 compute the previous noisy sample x_t -> x_t-1
            latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample
            # 3.3 report the step (diffusers' callback protocol); the callback may replace the latents
            if callback_on_step_end is not None:
                step_tensors = {"latents": latents}
                callback_kwargs = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs}
                latents = callback_on_step_end(self, i, t, callback_kwargs).pop("latents", latents)

        # 4. Decode: x = D(z / scaling_factor), then [-1, 1] -> [0, 1], in the requested output type
        image = self.to_output(self.decode_latents(latents), output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)

        return ImagePipelineOutput(images=image)
