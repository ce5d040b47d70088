"""The teacher of a distillation: its folder read and checked against the config before any work, and its guided
prediction at a noisy batch.

What is refused, each with a message that says what to do instead (`TeacherError`, before any weights are loaded
where the folder's JSON files tell):
  a path that is not a model folder, a folder of another kind of pipeline, an incomplete folder;
  a consistency student (LCMScheduler: it is already few-step), a super-resolution model, a flow-matching teacher;
  a skip interval that does not divide the teacher's training timesteps;
  an autoencoder that does not fit the config's data (channels, resolution) or is not the config run's autoencoder
  (other weights: other latents); classes or data that differ from those the teacher was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ldm.config import RunConfig
from ldm.data import DataInfo
from ldm.pipelines.guidance import combine_guidance, with_null_class
from ldm.pipelines.loading import (
    LATENT_PIPELINE_CLASSES,
    TEXT_PIPELINE_CLASSES,
    conditioning_of,
    denoiser_folder,
    folder_task,
    guidance_scale_of,
    is_student_folder,
    load_pipeline,
    pipeline_class_name,
)
from ldm.pipelines.pipeline_common import denoiser_output
from ldm.schedulers import objective_of

# The data keys that decide which images a model learned (a teacher distilled on other data learns nothing about it).
DATA_KEYS = ("source", "path", "hub_config", "split", "image_column", "label_column", "resolution", "color_mode",
             "caption_column", "caption_template")


class TeacherError(ValueError):
    """A teacher folder that cannot be distilled, or that does not fit the config; the message says why and what to
    do."""


def read_teacher(path: str | Path):
    """The teacher's pipeline, after checking from its JSON files that it is a trained DDPM-objective ldm or Stable
    Diffusion-format model that generates (TeacherError otherwise)."""
    path = Path(path)
    advice = ("give the pipeline folder that training wrote (<output_dir>/pipeline, or <output_dir>/unet/best) or a "
              "Stable Diffusion-format folder")
    if not path.is_dir():
        raise TeacherError(f"--model {str(path)!r}: no such folder; {advice}")
    if not (path / "model_index.json").is_file():
        raise TeacherError(f"--model {str(path)!r} is not a trained model: it has no model_index.json; {advice}")
    try:
        name = pipeline_class_name(path)
    except (OSError, ValueError) as e:
        raise TeacherError(f"--model {str(path)!r}: its model_index.json cannot be read ({e}); {advice}") from e
    if name not in TEXT_PIPELINE_CLASSES + LATENT_PIPELINE_CLASSES:
        raise TeacherError(f"--model {str(path)!r} holds a {name}, not a model that ldm trains; ldm distils "
                           f"{', '.join(LATENT_PIPELINE_CLASSES + TEXT_PIPELINE_CLASSES)} folders")
    parts = ("scheduler/scheduler_config.json", "vae/config.json") if name in TEXT_PIPELINE_CLASSES else (
        "scheduler/scheduler_config.json", "vae/config.json", f"{denoiser_folder(path)}/config.json")
    for part in parts:
        if not (path / part).is_file():
            raise TeacherError(f"--model {str(path)!r} is incomplete: it has no {part}; {advice}")
    if is_student_folder(path):
        raise TeacherError(f"--model {str(path)!r} is already a consistency-distilled student (its sampler is "
                           "LCMScheduler); distil the model it was distilled from")
    if folder_task(path) == "superres":
        raise TeacherError(f"--model {str(path)!r} is a super-resolution model; distillation makes few-step "
                           "generators of models that sample from noise")
    scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    if objective_of(scheduler) == "flow":
        raise TeacherError(
            f"--model {str(path)!r} is a flow-matching model (diffusion.objective: flow). Latent consistency "
            "distillation is built for DDPM-objective teachers (ε or v prediction, whose DDIM solver and boundary "
            "conditions it uses); a flow model samples well in few steps with flow-euler already (ldm sample --steps "
            "8), or train a DDPM teacher (diffusion.objective: ddpm) to distil")
    return load_pipeline(path)


def check_skip_interval(num_train_timesteps: int, skip_interval: int) -> None:
    if num_train_timesteps % skip_interval:
        divisors = [k for k in range(1, num_train_timesteps + 1) if num_train_timesteps % k == 0 and 5 <= k <= 100]
        raise TeacherError(f"distill.skip_interval={skip_interval} does not divide the teacher's "
                           f"{num_train_timesteps} training timesteps, so its solver grid would not end at t = 0; "
                           f"choose a divisor, e.g. {', '.join(map(str, divisors[:8])) or 1}")


def check_teacher(pipe, cfg: RunConfig, info: DataInfo, teacher_dir: str | Path) -> None:
    """TeacherError (or ValueError from a broken config VAE) when the teacher does not fit the config: its timesteps,
    its autoencoder (the data's channels and size, the config run's weights) and its data (classes, captions, the
    data keys of the run that trained it)."""
    check_skip_interval(pipe.scheduler.config.num_train_timesteps, cfg.distill.skip_interval)
    vae = pipe.vae
    if vae.config.in_channels != info.num_channels or vae.config.sample_size != info.resolution:
        raise TeacherError(
            f"the teacher's autoencoder makes {vae.config.sample_size}px {vae.config.in_channels}-channel images, but "
            f"the config's data is {info.resolution}px with {info.num_channels} channels (data.resolution, "
            "data.color_mode): distil with the config the teacher was trained with")
    _check_run_autoencoder(vae, cfg)
    kind = conditioning_of(pipe)
    if kind == "class":
        if info.num_classes is None:
            raise TeacherError(f"the teacher is class-conditional ({pipe.num_classes} classes), but the config's data "
                               "has no labels: distil with the config the teacher was trained with")
        names = pipe.class_names
        if info.num_classes != pipe.num_classes or (names and info.class_names and list(names) != info.class_names):
            raise TeacherError(f"the teacher's classes ({pipe.num_classes}: {names}) are not the data's "
                               f"({info.num_classes}: {info.class_names}); distil on the data it was trained on")
    if kind == "none" and cfg.distill.guidance_scale is not None:
        raise TeacherError("distill.guidance_scale: the teacher is unconditional, it has no guidance to distil; "
                           "leave it null")
    _check_run_data(cfg, Path(teacher_dir))


def _check_run_autoencoder(vae, cfg: RunConfig) -> None:
    """The config run's autoencoder (denoiser.vae_path, or <output_dir>/vae/model), if there is one, must be the
    teacher's: its latent cache and the teacher's latents would otherwise be different spaces."""
    from diffusers import AutoencoderKL

    from ldm.train.latent_cache import vae_fingerprint
    from ldm.train.unet import resolve_vae_path

    path = resolve_vae_path(cfg)
    if not (path / "config.json").is_file():
        return  # no autoencoder of the config's run: the teacher's own is used
    own = AutoencoderKL.from_pretrained(path, use_safetensors=True)
    same_scale = all(getattr(own.config, k, None) == getattr(vae.config, k, None)
                     for k in ("scaling_factor", "shift_factor"))
    if not same_scale or vae_fingerprint(own) != vae_fingerprint(vae):
        raise TeacherError(
            f"the teacher's autoencoder is not the config run's ({path}): other weights or latent scaling, so other "
            "latents. Distil with the config and --output_dir of the run that trained the teacher, or point "
            "--denoiser.vae_path at the teacher's own vae/ folder")


def _check_run_data(cfg: RunConfig, teacher_dir: Path) -> None:
    """The data keys of the run that trained the teacher (its folder's training_config.json, or the config.yaml of
    the run it lies in: <run>/pipeline, <run>/unet/best) must be the config's."""
    candidates = (teacher_dir / "training_config.json", teacher_dir.parent / "unet" / "config.yaml",
                  teacher_dir.parent / "config.yaml")
    saved = next((c for c in candidates if c.is_file() and (c.suffix == ".json" or c.parent.name == "unet")), None)
    if saved is None:
        return  # a folder from elsewhere: its data is unknown, the classes and autoencoder were checked
    tree = (json.loads if saved.suffix == ".json" else yaml.safe_load)(saved.read_text()) or {}
    data = tree.get("data") or {}
    now = {key: getattr(cfg.data, key) for key in DATA_KEYS}
    differ = [f"data.{key}={data[key]!r} (config: {now[key]!r})" for key in DATA_KEYS
              if key in data and data[key] != now[key]]
    if differ:
        raise TeacherError(f"the teacher was trained on other data than the config's ({saved}): {', '.join(differ)}; "
                           "distil with the config it was trained with")


@dataclass
class Condition:
    """What a batch is conditioned on, as the denoiser takes it: class ids, or text encoder states, or neither."""

    class_labels: torch.Tensor | None = None
    context: torch.Tensor | None = None


class Teacher:
    """The frozen teacher: its denoiser, its noise schedule, and its guided prediction for a batch."""

    def __init__(self, pipe, guidance_scale: float | None = None):
        self.pipe = pipe
        self.kind = conditioning_of(pipe)
        self.transformer = getattr(pipe, "transformer", None) is not None
        self.denoiser = pipe.transformer if self.transformer else pipe.unet
        self.denoiser.requires_grad_(False).eval()
        saved = guidance_scale_of(pipe)
        self.guidance_scale = 1.0 if self.kind == "none" else float(saved if guidance_scale is None else guidance_scale)
        config = pipe.scheduler.config
        self.prediction_type = config.get("prediction_type", "epsilon")
        from diffusers import DDPMScheduler

        # The training noise schedule (ᾱ_t) of whichever sampler the folder saved.
        self.alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod
        self.null_context = None

    def to(self, device: torch.device) -> Teacher:
        for name in ("vae", "unet", "transformer", "text_encoder"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.to(device)
        if self.kind == "text":
            self.pipe.text_encoder.requires_grad_(False).eval()
            self.null_context = self.encode([""], device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """The text encoder's last hidden state for each prompt, as StableDiffusionPipeline.encode_prompt (padded to
        the tokenizer's maximum; the attention mask only where the encoder's config asks for it)."""
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        mask = tokens.attention_mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
        return encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    def condition(self, batch: dict, device: torch.device) -> Condition:
        """The batch's condition: its labels (class), its captions encoded (text), or none."""
        if self.kind == "class":
            return Condition(class_labels=batch["label"].to(device))
        if self.kind == "text":
            return Condition(context=self.encode(list(batch["caption"]), device))
        return Condition()

    def output(self, model, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """`model`'s prediction (the teacher's, or a student's of the same kind) for the batch at t."""
        return denoiser_output(model, x, t, cond.class_labels, cond.context, transformer=self.transformer)

    @torch.no_grad()
    def guided_output(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """ε(∅) + s·(ε(c) − ε(∅)) of one batched pass over [x, x] with conditions [∅, c] (the conditional output
        alone at s = 1, the plain output for an unconditional teacher)."""
        if self.kind == "none" or self.guidance_scale == 1.0:
            return self.output(self.denoiser, x, t, cond)
        if self.kind == "class":
            both = Condition(class_labels=with_null_class(cond.class_labels, self.pipe.null_class))
        else:
            null = self.null_context.expand(len(x), -1, -1)
            both = Condition(context=torch.cat([null, cond.context]))
        output = self.output(self.denoiser, torch.cat([x, x]), torch.cat([t, t]), both)
        return combine_guidance(output, self.guidance_scale)
