"""What every ldm pipeline shares: class conditioning, one guided model call, decoding, and saving with its code.

`LatentPipelineMixin` is mixed into each pipeline class (``class P(LatentPipelineMixin, DiffusionPipeline)``). It is
not a `DiffusionPipeline` itself, on purpose: diffusers' `custom_pipeline=` loader accepts exactly one
`DiffusionPipeline` subclass per module, so the task modules (img2img, inpainting, super-resolution) must not
import another pipeline class.

This file imports only torch, diffusers and its siblings: it is copied into every saved model folder.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import shutil
from typing import ClassVar

import torch

from .guidance import ClassLabels, class_label_ids, combine_guidance, null_class_of, num_classes_of, with_null_class
from .latents import decode
from .noising import scale_model_input

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))

# The code of every ldm pipeline; each saved folder gets all of them, so that one folder loads as any task with
# `DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_latent_img2img", trust_remote_code=True)`.
# diffusers' dynamic module loader copies only the files the entry module imports relatively itself (`from .latents
# import ...`), not its siblings' imports: each pipeline module names every sibling that its code needs.
MODULE_FILES = (
    "pipeline_latent_diffusion.py",
    "pipeline_latent_img2img.py",
    "pipeline_latent_inpaint.py",
    "pipeline_latent_superres.py",
    "pipeline_latent_text_to_image.py",
    "pipeline_latent_text_dit.py",
    "pipeline_common.py",
    "image_inputs.py",
    "repaint.py",
    "noising.py",
    "latents.py",
    "guidance.py",
)

# A conditional model's guidance scale is saved with it (`guidance_scale` in model_index.json, from the training
# config's `denoiser.guidance_scale`) and used whenever a call gives none. This is the scale of folders saved before
# that: the lowest classifier-FID of the digits sweep, for the class and the text model alike (docs/conditioning.md).
DEFAULT_GUIDANCE_SCALE = 1.5
# The step count of a call that gives none, for models that saved no `num_inference_steps` of their own (a consistency
# student of `ldm distill` saves its own, e.g. 4).
DEFAULT_NUM_INFERENCE_STEPS = 50
# diffusers' DiTPipeline guides against this class id, hard-coded (ImageNet's 1000 classes): a class DiT saved for it
# has 1000 class embeddings (`num_embeds_ada_norm`), of which its own classes use the first.
DIT_PIPELINE_NULL_CLASS = 1000
# ldm's own keys in a stock DiTPipeline folder's model_index.json are written "_"-prefixed: diffusers drops such keys
# silently on loading (its form for "a value this class does not take"; text models keep `_guidance_scale` so), where
# DiTPipeline would warn about each plain one. ldm's classes read them back (`ldm_index`).
HIDDEN_DIT_KEYS = ("class_names", "guidance_scale", "num_classes", "num_inference_steps")


class SavedWithCodeMixin:
    """Saving and loading of a pipeline whose code travels in its folder (ldm's pipelines, and the text pipeline
    that subclasses StableDiffusionPipeline, which must not take LatentPipelineMixin's other methods)."""

    def to_json_string(self) -> str:
        # model_index.json names the class by ["<module file stem>", "<ClassName>"]: diffusers' documented form for
        # a custom pipeline whose code lies in the folder, so that `DiffusionPipeline.from_pretrained(folder,
        # trust_remote_code=True)` finds it where `ldm` is not installed.
        config = json.loads(super().to_json_string())
        config["_class_name"] = self.saved_class_name()
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def saved_class_name(self) -> str | list[str]:
        """What model_index.json's `_class_name` says: this class, by its module file in the folder."""
        return [type(self).__module__.rsplit(".", 1)[-1], type(self).__name__]

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        # `save_pretrained` (and therefore `push_to_hub`, which saves to a temporary folder and uploads it) writes
        # model_index.json through this method. The code files are written here, in the same step, so that a
        # model_index.json that names a pipeline module never exists without it.
        os.makedirs(save_directory, exist_ok=True)
        for file_name in MODULE_FILES:
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
        # nothing on disk is rewritten, and `DiffusionPipeline.from_pretrained` still reads the list form. It also
        # lets one folder load as any of ldm's pipelines (`LatentImg2ImgPipeline.from_pretrained(sampling_folder)`).
        config = super()._dict_from_json_file(json_file)
        if isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = config["_class_name"][1]
        return ldm_index(config)


class LatentPipelineMixin(SavedWithCodeMixin):
    """Shared methods of ldm's pipelines; the class using it registers `vae`, `scheduler` and the denoiser, as
    `unet` (UNet2DModel) or as `transformer` (DiTTransformer2DModel, diffusers' name for a DiT pipeline's network).
    Saving and loading with the code: SavedWithCodeMixin."""

    # One of the two is the denoiser, the other None (a list: diffusers' loader adds it to one).
    _optional_components: ClassVar[list[str]] = ["unet", "transformer"]

    def register_denoiser(self, vae, scheduler, unet, transformer, class_names: list[str] | None = None,
                          guidance_scale: float | None = None, num_classes: int | None = None) -> None:
        """Register the components (exactly one of `unet` and `transformer`) and a class model's names and scale."""
        if (unet is None) == (transformer is None):
            raise ValueError("give the denoiser as `unet` (a UNet2DModel) or as `transformer` (a "
                             "DiTTransformer2DModel): exactly one of them")
        self.register_modules(vae=vae, unet=unet, transformer=transformer, scheduler=scheduler)
        self.register_class_names(class_names, guidance_scale, num_classes)

    @property
    def denoiser(self):
        """The network that denoises the latents, whichever backbone it is."""
        transformer = getattr(self, "transformer", None)
        return transformer if transformer is not None else self.unet

    @property
    def num_classes(self) -> int | None:
        """Classes of a class-conditional model (the null class not counted); None for an unconditional one. A UNet
        counts them in its class embeddings; a DiT's are in model_index.json (`num_classes`), because one saved for
        diffusers' DiTPipeline has 1000 embeddings whatever its classes."""
        if getattr(self, "transformer", None) is not None:
            return getattr(self.config, "num_classes", None)
        return num_classes_of(self.unet)

    @property
    def null_class(self) -> int | None:
        """The class id of the unconditional branch of guidance: the last embedding (DiTPipeline's 1000 for a DiT
        saved for it)."""
        if self.num_classes is None:
            return None
        return null_class_of(self.denoiser) if getattr(self, "transformer", None) is not None else self.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return getattr(self.config, "class_names", None)

    @property
    def is_superres_model(self) -> bool:
        """Whether the denoiser takes a low-resolution image beside the latents (in_channels > latent channels)."""
        return self.denoiser.config.in_channels != self.vae.config.latent_channels

    @property
    def default_num_inference_steps(self) -> int:
        """The steps a call samples with when it gives none: the model's own (a consistency student's), else 50."""
        saved = getattr(self.config, "num_inference_steps", None)
        return DEFAULT_NUM_INFERENCE_STEPS if saved is None else int(saved)

    def register_num_inference_steps(self, num_inference_steps: int | None) -> None:
        """Record the model's own step count in model_index.json (only where given: other folders stay as they were)."""
        if num_inference_steps is None:
            return
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) or \
                num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        self.register_to_config(num_inference_steps=int(num_inference_steps))

    @property
    def default_guidance_scale(self) -> float:
        """The scale a class model samples at when a call gives none: its own, saved in model_index.json."""
        saved = getattr(self.config, "guidance_scale", None)
        return DEFAULT_GUIDANCE_SCALE if saved is None else float(saved)

    def register_class_names(self, class_names: list[str] | None, guidance_scale: float | None = None,
                             num_classes: int | None = None) -> None:
        """Record a class model's class names and its guidance scale in the config (so in model_index.json), and a
        class DiT's number of classes (a UNet's is its number of class embeddings less one)."""
        if getattr(self, "transformer", None) is not None:
            embeddings = null_class_of(self.transformer)
            if num_classes is not None:
                if not 1 <= num_classes <= embeddings:
                    raise ValueError(f"num_classes: {num_classes} classes do not fit a transformer with "
                                     f"{embeddings} class embeddings")
                self.register_to_config(num_classes=int(num_classes))
        elif num_classes is not None and num_classes != num_classes_of(self.unet):
            raise ValueError(f"num_classes: {num_classes}, but the UNet has {num_classes_of(self.unet)} classes")
        num_classes = self.num_classes
        if class_names is not None:
            if num_classes is None or len(class_names) != num_classes:
                network = "transformer" if getattr(self, "transformer", None) is not None else "UNet"
                raise ValueError(f"class_names: {len(class_names)} names for a {network} with "
                                 f"{'no' if num_classes is None else num_classes} classes")
            # Only class models record it, so unconditional folders keep the model_index.json they always had.
            self.register_to_config(class_names=list(class_names))
        if guidance_scale is not None:
            if num_classes is None:
                raise ValueError("guidance_scale: this model is unconditional (its UNet has no class embedding); "
                                 "it has no guidance scale")
            if not (isinstance(guidance_scale, numbers.Real) and math.isfinite(guidance_scale) and guidance_scale >= 0):
                raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
            self.register_to_config(guidance_scale=float(guidance_scale))

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names (or ids) to class ids, as diffusers' DiTPipeline does."""
        if self.num_classes is None:
            raise ValueError("this model is unconditional: it has no classes")
        return class_label_ids(label, self.num_classes, self.class_names)

    def check_generation_model(self) -> None:
        """Sampling, img2img and inpainting need a UNet over the latents alone, not a super-resolution UNet."""
        if self.is_superres_model:
            raise ValueError(
                f"unet: this is a super-resolution model (it takes {self.denoiser.config.in_channels} channels: "
                f"{self.vae.config.latent_channels} latent + the low-resolution image); use "
                "LatentSuperResolutionPipeline (`ldm upscale`) with it")

    def check_inputs(self, batch_size: int | None, class_labels: ClassLabels | None,
                     guidance_scale: float | None) -> tuple[int, list[int] | None, float]:
        """Validate the conditioning arguments before any work; returns (batch size, class ids, guidance scale)."""
        self.check_generation_model()
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
        guidance_scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
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
            class_labels = with_null_class(class_labels, self.null_class)
        # scale the input as the scheduler requires (identity for DDPM/DDIM and flow, 1/sqrt(σ²+1) for Euler)
        model_input = scale_model_input(self.scheduler, model_input, t)
        model_output = self.model_output(model_input, t, class_labels)
        return combine_guidance(model_output, guidance_scale) if guide else model_output

    def stock_dit_problem(self) -> str | None:
        """Why diffusers' DiTPipeline would not draw this pipeline's images (None: it draws the same ones)."""
        if getattr(self, "transformer", None) is None or self.num_classes is None:
            return "it is not a class-conditional DiT"
        return dit_pipeline_problem(self.vae, self.num_classes, self.null_class, self.scheduler)

    def to_json_string(self) -> str:
        config = json.loads(super().to_json_string())
        return json.dumps(stock_dit_index(config), indent=2, sort_keys=True) + "\n"

    def saved_class_name(self) -> str | list[str]:
        # A class DiT that DiTPipeline samples right is saved as a stock DiTPipeline folder (as a text UNet is a
        # StableDiffusionPipeline one): diffusers reads a ["file", "Class"] name as "run this folder's code", even
        # for an explicit `DiTPipeline.from_pretrained`. ldm still reads it with its own class (`loading.py`), and
        # the code files stay in the folder for `custom_pipeline=`.
        return "DiTPipeline" if self.stock_dit_problem() is None else super().saved_class_name()

    def model_output(self, model_input: torch.Tensor, t, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's prediction, whichever backbone it is (`denoiser_output`)."""
        return denoiser_output(self.denoiser, model_input, t, class_labels,
                               transformer=getattr(self, "transformer", None) is not None)

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

    @staticmethod
    def check_output_type(output_type: str | None) -> None:
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """x = D(z / scaling_factor), then [-1, 1] -> [0, 1] (NCHW, float)."""
        return (decode(self.vae, latents) / 2 + 0.5).clamp(0, 1)

    def to_output(self, image: torch.Tensor, output_type: str):
        """[0, 1] NCHW -> "pt" as is, "np" NHWC float, "pil" images (mode "L" for one channel)."""
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(image) if output_type == "pil" else image


def denoiser_output(model, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                    encoder_hidden_states: torch.Tensor | None = None, transformer: bool = False) -> torch.Tensor:
    """The prediction of either backbone for a batch, in one place for training and every pipeline.

    A UNet takes (sample, t, class_labels= | encoder_hidden_states=) as it is. diffusers' latent transformers differ
    in three ways, adapted here: the timestep must be one per sample (their embeddings take a 1-D batch), a DiT
    always takes a class (an unconditional DiT has one class, id 0, see `ldm.dit`), and PixArt's text transformer
    takes the encoder states before the timestep. `transformer` says which (training's model may be wrapped in DDP,
    whose class says nothing).
    """
    if not transformer:
        if encoder_hidden_states is not None:
            return model(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        return model(sample, timestep, class_labels=class_labels).sample
    timestep = torch.as_tensor(timestep, device=sample.device)
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    if encoder_hidden_states is not None:
        return model(sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep).sample
    if class_labels is None:
        class_labels = torch.zeros(sample.shape[0], dtype=torch.long, device=sample.device)
    return model(sample, timestep, class_labels=class_labels).sample


def stock_dit_index(config: dict) -> dict:
    """A model_index.json as a stock DiTPipeline folder has it (other folders as they are): no `unet` entry, ldm's
    keys "_"-prefixed (HIDDEN_DIT_KEYS), and DiTPipeline's `id2label` from the class names, so that its
    `get_label_ids` takes them."""
    if config.get("_class_name") != "DiTPipeline":
        return config
    config = {k: v for k, v in config.items() if k != "unet"}
    if config.get("class_names"):
        config["id2label"] = {str(i): name for i, name in enumerate(config["class_names"])}
    for key in HIDDEN_DIT_KEYS:
        if key in config:
            config[f"_{key}"] = config.pop(key)
    return config


def ldm_index(config: dict) -> dict:
    """A model_index.json as ldm's classes read it: `stock_dit_index` undone (other folders as they are)."""
    if config.get("_class_name") != "DiTPipeline":
        return config
    config = {k: v for k, v in config.items() if k != "id2label"}
    for key in HIDDEN_DIT_KEYS:
        if f"_{key}" in config:
            config[key] = config.pop(f"_{key}")
    return config


def dit_pipeline_problem(vae, num_classes: int, class_embeddings: int | None = None,
                         scheduler=None) -> str | None:
    """Why diffusers' DiTPipeline would not draw a class DiT's images as ldm's pipeline does (None: it would).

    DiTPipeline (diffusers/pipelines/dit/pipeline_dit.py) 1. draws unit-variance latents, 2. at every step calls
    `scheduler.scale_model_input` and the transformer, guiding against the class id 1000, 3. decodes
    ``D(latents / scaling_factor)``, never adding a shift_factor back. Checked for the autoencoder and classes
    (before training: `denoiser.model.stock_pipeline`), and for the built embeddings and saved sampler (at save time).
    """
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        return f"its autoencoder has shift_factor {shift:.4f}, which DiTPipeline never adds back when decoding"
    if num_classes > DIT_PIPELINE_NULL_CLASS:
        return (f"its {num_classes} classes do not fit below DiTPipeline's null class {DIT_PIPELINE_NULL_CLASS} "
                "(ImageNet's 1000)")
    if scheduler is not None:
        name = type(scheduler).__name__
        if not hasattr(scheduler, "scale_model_input"):
            return (f"its sampler {name} has no scale_model_input, which DiTPipeline calls at every step (a "
                    "flow-matching model)")
        sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
        if sigma != 1.0:
            return (f"its sampler {name} starts from noise of std {sigma:.3g}, DiTPipeline from unit noise (swap "
                    "pipe.scheduler for DDIM or DPM-Solver++, or save with another denoiser.sample_scheduler)")
    if class_embeddings is not None and class_embeddings != DIT_PIPELINE_NULL_CLASS:
        return (f"its null class is {class_embeddings} (denoiser.model.stock_pipeline=false sizes the class "
                f"embeddings to the data), DiTPipeline's is {DIT_PIPELINE_NULL_CLASS}")
    return None
