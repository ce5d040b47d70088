"""LatentDiffusionPipeline: unconditional or class-conditional sampling with a KL autoencoder and a latent UNet.

This module is copied, together with `latents.py` and `guidance.py`, into every saved model folder, so that
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` works where only torch and diffusers are
installed. It must therefore import only torch, diffusers, numpy/PIL, the standard library and its sibling files.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import shutil

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .guidance import ClassLabels, class_label_ids, combine_guidance, num_classes_of, with_null_class
from .latents import decode

# The files that make up this pipeline's code; `save_pretrained` writes them beside model_index.json. diffusers'
# dynamic module loader copies every file that the module imports relatively (`from .latents import ...`).
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
_MODULE_NAME = os.path.splitext(os.path.basename(__file__))[0]  # "pipeline": the file stem in `_class_name`
_MODULE_FILES = (os.path.basename(__file__), "latents.py", "guidance.py")


DEFAULT_GUIDANCE_SCALE = 2.0  # class-conditional models, when guidance_scale is not given (best on the digits, docs/conditioning.md)


class LatentDiffusionPipeline(DiffusionPipeline):
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
        unet ([`UNet2DModel`]):
            A `UNet2DModel` that predicts the noise (or v / x0, as its scheduler's `prediction_type` says) of the
            latents.
        scheduler ([`SchedulerMixin`]):
            Any diffusers scheduler, e.g. [`DDPMScheduler`], [`DDIMScheduler`], [`DPMSolverMultistepScheduler`],
            [`EulerDiscreteScheduler`] or [`UniPCMultistepScheduler`].
        class_names (`List[str]`, *optional*):
            Names of the classes of a class-conditional UNet, in id order; saved in model_index.json, so that
            `class_labels` may name them.

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

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, vae: AutoencoderKL, unet: UNet2DModel, scheduler: SchedulerMixin,
                 class_names: list[str] | None = None):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)
        num_classes = num_classes_of(unet)
        if class_names is not None:
            if num_classes is None or len(class_names) != num_classes:
                raise ValueError(f"class_names: {len(class_names)} names for a UNet with "
                                 f"{'no' if num_classes is None else num_classes} classes")
            # Only class models record it, so unconditional folders keep the model_index.json they always had.
            self.register_to_config(class_names=list(class_names))

    @property
    def num_classes(self) -> int | None:
        """Classes of a class-conditional model (the null class not counted); None for an unconditional one."""
        return num_classes_of(self.unet)

    @property
    def class_names(self) -> list[str] | None:
        return getattr(self.config, "class_names", None)

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names (or ids) to class ids, as diffusers' DiTPipeline does."""
        if self.num_classes is None:
            raise ValueError("this model is unconditional: it has no classes")
        return class_label_ids(label, self.num_classes, self.class_names)

    def check_inputs(self, batch_size: int | None, class_labels: ClassLabels | None,
                     guidance_scale: float | None) -> tuple[int, list[int] | None, float]:
        """Validate the conditioning arguments before any work; returns (batch size, class ids, guidance scale)."""
        if self.num_classes is None:
            for name, value in (("class_labels", class_labels), ("guidance_scale", guidance_scale)):
                if value is not None:
                    raise ValueError(f"{name}: this model is unconditional (its UNet has no class embedding), so "
                                     f"it takes no {name}; leave it out")
            return batch_size or 1, None, 1.0
        if class_labels is None:
            raise ValueError(f"class_labels: this model is class-conditional; pass one class per image "
                             f"({', '.join(self.class_names or map(str, range(self.num_classes)))})")
        ids = class_label_ids(class_labels, self.num_classes, self.class_names)
        if len(ids) == 1 and batch_size:
            ids = ids * batch_size  # one label for the whole batch
        if batch_size is not None and batch_size != len(ids):
            raise ValueError(f"class_labels has {len(ids)} labels but batch_size is {batch_size}; give one label "
                             "per image, or one label for the whole batch")
        guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else float(guidance_scale)
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1: no guidance), got {guidance_scale}")
        return len(ids), ids, guidance_scale

    def check_numbers(self, batch_size, num_inference_steps, eta, guidance_scale) -> None:
        """Numbers that would otherwise fail deep inside torch or the scheduler, named before any work."""
        def is_int(value) -> bool:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        def is_real(value) -> bool:
            return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

        if batch_size is not None and not (is_int(batch_size) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        steps = self.scheduler.config.num_train_timesteps
        if not (is_int(num_inference_steps) and 1 <= num_inference_steps <= steps):
            raise ValueError(f"num_inference_steps must be an int from 1 to the {steps} training timesteps, got "
                             f"{num_inference_steps!r}")
        if not (is_real(eta) and 0 <= eta <= 1):
            raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM), got {eta!r}")
        if guidance_scale is not None and not is_real(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")

    def predict_noise(self, latents: torch.Tensor, t, class_labels: torch.Tensor | None = None,
                      guidance_scale: float = 1.0) -> torch.Tensor:
        """The model output at step t: unconditional, conditional (guidance_scale 1), or guided, where the
        conditional and unconditional branches run as one batched pass over [x_t, x_t] with classes [∅, c]."""
        guide = class_labels is not None and guidance_scale != 1.0
        model_input = torch.cat([latents] * 2) if guide else latents
        if guide:
            class_labels = with_null_class(class_labels, self.num_classes)
        # scale the input as the scheduler requires (identity for DDPM/DDIM, 1/sqrt(σ²+1) for Euler)
        model_input = self.scheduler.scale_model_input(model_input, t)
        model_output = self.unet(model_input, t, class_labels=class_labels).sample
        return combine_guidance(model_output, guidance_scale) if guide else model_output

    def prepare_extra_step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None, eta: float) -> dict:
        # Not all schedulers have the same `step` signature: `eta` (η of DDIM, arXiv:2010.02502) is only used by
        # DDIMScheduler, and `generator` only by stochastic samplers (DDPM, Euler, SDE variants).
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        extra_step_kwargs = {}
        if "eta" in step_params:
            extra_step_kwargs["eta"] = eta
        if "generator" in step_params:
            extra_step_kwargs["generator"] = generator
        return extra_step_kwargs

    def prepare_latents(
        self,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sample_size = self.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        shape = (batch_size, self.unet.config.in_channels, height, width)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size}; pass one per image.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        else:
            latents = latents.to(device=device, dtype=self.unet.dtype)
        # scale the initial noise by the standard deviation required by the scheduler (1 for DDPM/DDIM, σ_max for Euler)
        return latents * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        class_labels: ClassLabels | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        output_type: str | None = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        The call function to the pipeline for generation.

        Args:
            batch_size (`int`, *optional*):
                Number of images to generate; defaults to 1, or to the number of `class_labels`.
            class_labels (`int`, `str`, `List[int | str]` or `torch.Tensor`, *optional*):
                Class-conditional models only (required there): the class of each image, as an id or a name from
                `class_names`; a single label is used for the whole batch.
            guidance_scale (`float`, *optional*, defaults to 2.0 for class-conditional models):
                Classifier-free guidance scale s: ε(∅) + s (ε(c) − ε(∅)). 1 samples the conditional model alone
                (one forward pass per step); other values run the conditional and unconditional branches as one
                batched pass. Unconditional models take no guidance_scale.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*):
                A [`torch.Generator`](https://pytorch.org/docs/stable/generated/torch.Generator.html) to make
                generation deterministic; a list of `batch_size` generators makes each image depend only on its own.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The number of denoising steps. More denoising steps usually lead to a higher quality image at the
                expense of slower inference.
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

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`:
                If `return_dict` is `True`, [`~pipelines.ImagePipelineOutput`] is returned, otherwise a `tuple` is
                returned where the first element is a list with the generated images
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        self.check_numbers(batch_size, num_inference_steps, eta, guidance_scale)
        batch_size, label_ids, guidance_scale = self.check_inputs(batch_size, class_labels, guidance_scale)
        device = self._execution_device

        # 1. Set the timesteps of the sampler first: the initial noise scale of σ-based schedulers (Euler) is the
        #    first σ of these timesteps, which is below the training σ_max unless the first step is at t = T-1
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 2. Sample Gaussian noise x_T in latent space, scaled for the scheduler
        latents = self.prepare_latents(batch_size, generator, device, latents)
        labels = None if label_ids is None else torch.tensor(label_ids, dtype=torch.long, device=device)

        # 3. Denoise: x_t -> x_t-1 for each timestep
        for t in self.progress_bar(self.scheduler.timesteps):
            # 3.1 predict the noise residual (or v / x0), guided for class-conditional models
            model_output = self.predict_noise(latents, t, labels, guidance_scale)
            # 3.2 compute the previous noisy sample x_t -> x_t-1
            latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample

        # 4. Decode: x = D(z / scaling_factor), then [-1, 1] -> [0, 1]
        image = decode(self.vae, latents)
        image = (image / 2 + 0.5).clamp(0, 1)

        # 5. Convert to the requested output type
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)

        return ImagePipelineOutput(images=image)

    # ----- saving and loading -----

    def to_json_string(self) -> str:
        # model_index.json names the class by ["<module file stem>", "<ClassName>"]: diffusers' documented form for
        # a custom pipeline whose code lies in the folder, so that `DiffusionPipeline.from_pretrained(folder,
        # trust_remote_code=True)` finds it where `ldm` is not installed.
        config = json.loads(super().to_json_string())
        config["_class_name"] = [_MODULE_NAME, type(self).__name__]
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        # `save_pretrained` (and therefore `push_to_hub`, which saves to a temporary folder and uploads it) writes
        # model_index.json through this method. The code files are written here, in the same step, so that a
        # model_index.json that names `pipeline_latent_diffusion.py` never exists without it.
        os.makedirs(save_directory, exist_ok=True)
        for file_name in _MODULE_FILES:
            shutil.copyfile(os.path.join(_MODULE_DIR, file_name), os.path.join(save_directory, file_name))
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict:
        # How `LatentDiffusionPipeline.from_pretrained(folder)` returns an instance of THIS class without
        # `trust_remote_code`: diffusers reads the list form ["pipeline", "LatentDiffusionPipeline"] of `_class_name`
        # as "load the pipeline class from the folder's code", which needs `trust_remote_code=True` and gives the
        # dynamic copy of the class (isinstance is False). When the class is named explicitly, diffusers' own rule is
        # "use the explicit class", so we give it the plain class name: every model_index.json read by this class
        # (`load_config` for local folders, `download` for Hub repos) goes through this method. The rest of
        # diffusers' loader is untouched (Hub downloads, dtype, device_map, variants, components passed as kwargs),
        # nothing on disk is rewritten, and `DiffusionPipeline.from_pretrained` still reads the list form.
        config = super()._dict_from_json_file(json_file)
        if isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = config["_class_name"][1]
        return config
