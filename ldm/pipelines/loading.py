"""Load any model folder that ldm saves, with the right pipeline class, and tell what it is conditioned on.

  model_index.json `_class_name`                 pipeline                     conditioning
  ["pipeline_latent_diffusion", "LatentDiffusionPipeline"]   LatentDiffusionPipeline    none, or class when the UNet
                                                                                          has class embeddings
  "StableDiffusionPipeline"                      diffusers' StableDiffusionPipeline       text
  ["pipeline_latent_text_to_image", "LatentTextToImagePipeline"]   its subclass that decodes   text
                                                 with the autoencoder's shift_factor
  ["pipeline_latent_text_dit", "LatentTextDiTPipeline"]   a text transformer's           text

ldm's own pipelines hold the denoiser as `unet` (unet/ in the folder) or, for a DiT, as `transformer` (transformer/,
diffusers' name). A class DiT's folder is a stock DiTPipeline folder (`_class_name` "DiTPipeline", ldm's code still
in it) when `pipeline_common.dit_pipeline_problem` finds nothing in the way, and `save_pipeline` says in one line
what it found otherwise; ldm reads such folders with LatentDiffusionPipeline.

Not copied into model folders (it imports both kinds of pipeline).

Weights are read as safetensors only (`use_safetensors=True`: a folder of pickled `.bin` weights is refused, not
unpickled), each file checked first so that a truncated or altered one is named; ldm never passes
`trust_remote_code`: ldm's own class is used for its folders, whatever code files the folder holds.
"""

from __future__ import annotations

import json
import os

from .pipeline_common import ldm_index
from .pipeline_latent_diffusion import LatentDiffusionPipeline

# diffusers' Stable Diffusion modules are imported only for text models: importing them makes transformers warn
# about image processors that ldm never uses.

TEXT_PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "LatentTextToImagePipeline",
                         "LatentTextDiTPipeline")
LATENT_PIPELINE_CLASSES = ("LatentDiffusionPipeline", "LatentImg2ImgPipeline", "LatentInpaintPipeline",
                           "LatentSuperResolutionPipeline", "DiTPipeline")


def pipeline_class_name(path: str | os.PathLike) -> str:
    """The class model_index.json names (the class part of a ["file", "Class"] pair)."""
    with open(os.path.join(path, "model_index.json")) as f:
        name = json.load(f).get("_class_name")
    return name[1] if isinstance(name, (list, tuple)) else str(name)


class WeightsFileError(ValueError):
    """A weights file that is not readable safetensors (truncated, altered, or not safetensors at all)."""


def check_weights_files(path: str | os.PathLike) -> None:
    """WeightsFileError naming the first `*.safetensors` file under `path` whose header and size do not parse (a
    truncated file, an altered header, an empty file), before any weights are loaded."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(path).rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise WeightsFileError(f"{file} is not a readable safetensors file ({e}): it is truncated or was "
                                   "modified; save or download it again") from e


def load_pipeline(path: str | os.PathLike, **kwargs):
    """ldm's pipeline class or StableDiffusionPipeline, whichever the folder holds (kwargs: from_pretrained's)."""
    name = pipeline_class_name(path)
    check_weights_files(path)
    kwargs.setdefault("use_safetensors", True)
    if name in TEXT_PIPELINE_CLASSES:
        from diffusers import StableDiffusionPipeline

        from .pipeline_latent_text_dit import LatentTextDiTPipeline
        from .pipeline_latent_text_to_image import LatentTextToImagePipeline
        from .text_to_image import TEXT_GUIDANCE_KEY, TEXT_STEPS_KEY

        # A text model with a shifted autoencoder is ldm's own class (text_to_image.py): loading it as a stock
        # StableDiffusionPipeline would decode without the shift.
        cls = {"LatentTextToImagePipeline": LatentTextToImagePipeline,
               "LatentTextDiTPipeline": LatentTextDiTPipeline}.get(name, StableDiffusionPipeline)
        pipe = cls.from_pretrained(path, **kwargs)
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        for key in (TEXT_GUIDANCE_KEY, TEXT_STEPS_KEY):
            if index.get(key) is not None:  # diffusers drops "_" keys on loading; keep them, and when saved again
                pipe.register_to_config(**{key: index[key]})
        return pipe
    if name in LATENT_PIPELINE_CLASSES:
        from . import pipeline_latent_img2img, pipeline_latent_inpaint, pipeline_latent_superres

        classes = {c.__name__: c for c in (LatentDiffusionPipeline, pipeline_latent_img2img.LatentImg2ImgPipeline,
                                           pipeline_latent_inpaint.LatentInpaintPipeline,
                                           pipeline_latent_superres.LatentSuperResolutionPipeline)}
        if name == "DiTPipeline":  # a class DiT that ldm saved as a stock DiTPipeline folder
            check_ldm_dit_folder(path)
            return LatentDiffusionPipeline.from_pretrained(path, **kwargs)
        return classes[name].from_pretrained(path, **kwargs)
    raise ValueError(f"{path} holds a {name}; ldm reads {', '.join(LATENT_PIPELINE_CLASSES)} and StableDiffusionPipeline folders")


def check_ldm_dit_folder(path: str | os.PathLike) -> None:
    """A DiTPipeline folder that ldm did not save (no `num_classes`: e.g. facebook/DiT-XL-2-256, which predicts a
    learned variance too) is refused by name instead of sampled wrong."""
    with open(os.path.join(path, "model_index.json")) as f:
        if ldm_index(json.load(f)).get("num_classes") is None:
            raise ValueError(f"{path} is a DiTPipeline folder that ldm did not save (model_index.json has no "
                             "num_classes); load it with diffusers' DiTPipeline")


def is_text_pipeline(pipe) -> bool:
    """Whether `pipe` is conditioned on text prompts (a Stable Diffusion pipeline with a tokenizer)."""
    return getattr(pipe, "tokenizer", None) is not None and getattr(pipe, "text_encoder", None) is not None


def conditioning_of(pipe) -> str:
    """"none", "class" or "text"."""
    if is_text_pipeline(pipe):
        return "text"
    return "class" if getattr(pipe, "num_classes", None) is not None else "none"


def guidance_scale_of(pipe) -> float | None:
    """The guidance scale a conditional model samples at when none is given (None for unconditional models): the
    one saved with it (`guidance_scale` of ldm's pipelines, `_guidance_scale` of a text model's model_index.json, see
    text_to_image.py), else `DEFAULT_GUIDANCE_SCALE`; for text models too, not Stable Diffusion's 7.5."""
    from .pipeline_common import DEFAULT_GUIDANCE_SCALE

    kind = conditioning_of(pipe)
    if kind == "none":
        return None
    if kind == "class":
        saved = pipe.config.get("guidance_scale")
    else:
        from .text_to_image import TEXT_GUIDANCE_KEY

        saved = pipe.config.get(TEXT_GUIDANCE_KEY, pipe.config.get("guidance_scale"))  # SD folders | ldm's text DiT
    return DEFAULT_GUIDANCE_SCALE if saved is None else float(saved)


def num_inference_steps_of(pipe) -> int:
    """The steps a model samples with when none are given: its own (a consistency student's, `num_inference_steps` of
    ldm's pipelines or `_num_inference_steps` of a text folder's model_index.json), else 50."""
    from .pipeline_common import DEFAULT_NUM_INFERENCE_STEPS
    from .text_to_image import TEXT_STEPS_KEY

    saved = pipe.config.get("num_inference_steps", pipe.config.get(TEXT_STEPS_KEY))
    return DEFAULT_NUM_INFERENCE_STEPS if saved is None else int(saved)


def fit_steps(pipe, num_inference_steps: int) -> None:
    """Before sampling a loaded pipeline with `num_inference_steps`: a consistency student asked for more steps than
    it was distilled on warns, and its scheduler gets a grid of that many points (`noising.consistency_grid`), so
    that stock pipelines (a text student's StableDiffusionPipeline), whose LCMScheduler would refuse, sample too."""
    from .noising import consistency_grid

    grid = consistency_grid(pipe.scheduler, num_inference_steps)
    if grid is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, original_inference_steps=grid)


def is_student_folder(path: str | os.PathLike) -> bool:
    """Whether a folder holds a consistency student of `ldm distill` (its sampler is an LCMScheduler), from its JSON."""
    config = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("_class_name") == "LCMScheduler"


def save_pipeline(pipe, directory: str | os.PathLike) -> None:
    """Save either kind of pipeline (a text pipeline with its tokenizer in CLIP's vocab.json + merges.txt too)."""
    if is_text_pipeline(pipe):
        from .text_to_image import save_text_pipeline

        save_text_pipeline(pipe, directory)
        return
    if getattr(pipe, "transformer", None) is not None and pipe.num_classes is not None:
        problem = pipe.stock_dit_problem()  # None: saved as a stock DiTPipeline folder (pipeline_common)
        if problem is not None:
            print(f"class DiT saved as ldm's LatentDiffusionPipeline, not a stock DiTPipeline folder: {problem} "
                  "(load it with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True))")
    pipe.save_pretrained(directory)


def denoiser_folder(path: str | os.PathLike) -> str:
    """The sub-folder holding the denoiser: "transformer" (a DiT) or "unet"."""
    return "transformer" if os.path.isfile(os.path.join(path, "transformer", "config.json")) else "unet"


def folder_task(path: str | os.PathLike) -> str:
    """"generate" or "superres" (the denoiser takes the low-res image beside the latents), from the JSON files alone."""
    if pipeline_class_name(path) in TEXT_PIPELINE_CLASSES:
        return "generate"
    configs = {}
    for name in (denoiser_folder(path), "vae"):
        with open(os.path.join(path, name, "config.json")) as f:
            configs[name] = json.load(f)
    denoiser = configs[denoiser_folder(path)]
    return "superres" if denoiser["in_channels"] != configs["vae"]["latent_channels"] else "generate"


def folder_conditioning(path: str | os.PathLike) -> tuple[str, list[str] | None, int | None]:
    """(conditioning, class names, number of classes) of a saved folder, from its JSON files alone, so that a
    command can check its arguments before loading any weights."""
    if pipeline_class_name(path) in TEXT_PIPELINE_CLASSES:
        return "text", None, None
    with open(os.path.join(path, "model_index.json")) as f:
        index = ldm_index(json.load(f))
    class_names = index.get("class_names")
    if denoiser_folder(path) == "transformer":  # a DiT's classes are counted in model_index.json (pipeline_common)
        num_classes = index.get("num_classes")
        return ("none", None, None) if num_classes is None else ("class", class_names, num_classes)
    unet_config = os.path.join(path, "unet", "config.json")
    num_embeds = None
    if os.path.isfile(unet_config):
        with open(unet_config) as f:
            num_embeds = json.load(f).get("num_class_embeds")
    if num_embeds is None:
        return "none", None, None
    return "class", class_names, num_embeds - 1
