"""Text conditioning: captions through a transformers text encoder into the cross-attention of a
UNet2DConditionModel, trained so that the result is a stock StableDiffusionPipeline (or of PixArt's transformer,
denoiser.model.type=dit, saved as ldm's LatentTextDiTPipeline: diffusers has no stock pipeline for it over these
encoders, `ldm.pipelines.pipeline_latent_text_dit`).

Two encoders (`denoiser.text_encoder`):
  null (default, offline)  a small CLIPTextModel trained jointly with the UNet from scratch (as the LDM paper's
                           text-to-image model trained its text transformer), over a CLIP tokenizer learned from the
                           training captions (`ldm.tokenizer`), saved in <output_dir>/unet/tokenizer
  a Hub id or folder       a pretrained CLIPTextModel / T5EncoderModel, frozen; its embedding of every distinct
                           caption is computed once and cached beside the latents (`ldm.train.prompt_cache`)

Condition dropout replaces a caption by "" (the prompt Stable Diffusion encodes for its unconditional branch, so
`guidance_scale` and `negative_prompt` work as in any SD model).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState
from torch import nn

from ldm.captions import all_captions, class_prompts
from ldm.config import ConfigError, RunConfig
from ldm.data import DataInfo
from ldm.images import image_grid
from ldm.models import build_text_denoiser
from ldm.pipelines.pipeline_common import denoiser_output
from ldm.pipelines.text_to_image import make_text_pipeline
from ldm.text_encoder import PromptTokenizer, build_text_encoder, hidden_size, load_pretrained_text_encoder
from ldm.tokenizer import build_clip_tokenizer
from ldm.train import latent_cache, prompt_cache
from ldm.train.conditioning import is_transformer
from ldm.train.devices import use_cpu

MAX_GRID_PROMPTS = 10  # rows of a sample grid when prompts come from free captions


class TextConditionedUNet(nn.Module):
    """The denoiser (a UNet, or a text transformer) and the text encoder trained together, as one module: DDP, EMA,
    gradient clipping and checkpoints of the training spine then cover both, and the saved pair always comes from
    the same step. The denoiser is held under its pipeline component's name, `unet` or `transformer` (so UNet runs'
    checkpoints keep their keys)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.transformer_backbone = is_transformer(unet)
        self.denoiser_name = "transformer" if self.transformer_backbone else "unet"
        self.add_module(self.denoiser_name, unet)
        self.text_encoder = text_encoder

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.denoiser_name)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        encoder_hidden_states = self.text_encoder(input_ids)[0]  # last hidden state, as StableDiffusionPipeline
        return denoiser_output(self.denoiser, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                               transformer=self.transformer_backbone)


class TextConditioning:
    kind = "text"
    transformer = False  # whether the network built is PixArt's transformer (set by build_model)

    def __init__(self, tokenizer: PromptTokenizer, cond_dropout: float, guidance_scale: float,
                 prompts: list[str], prompt_labels: list[int] | None, frozen_encoder=None, embeddings=None):
        self.tokenizer = tokenizer
        self.cond_dropout, self.guidance_scale = cond_dropout, guidance_scale
        self.prompts, self.prompt_labels = prompts, prompt_labels
        self.frozen_encoder, self.embeddings = frozen_encoder, embeddings

    @classmethod
    def create(cls, cfg: RunConfig, info: DataInfo, train_dataset, stage_dir: Path) -> TextConditioning:
        """Read every training caption, then build the tokenizer (from scratch) or the prompt cache (frozen)."""
        if isinstance(train_dataset, torch.utils.data.IterableDataset):
            raise ConfigError("denoiser.conditioning=text reads every caption before training (tokenizer, prompt "
                              "cache), which a stream cannot give up front: keep denoiser.latent_cache on (it is built "
                              "from the stream in one pass) or set data.streaming=false")
        captions = all_captions(train_dataset, info.captions)
        state = PartialState(cpu=use_cpu(cfg.denoiser.train))
        frozen, embeddings = None, None
        if cfg.denoiser.text_encoder:
            frozen, hf_tokenizer = load_pretrained_text_encoder(cfg.denoiser.text_encoder)
            tokenizer = PromptTokenizer(hf_tokenizer)
            tokenizer.check(captions, complete=True)
            embeddings = prompt_cache.build_or_load(frozen, tokenizer, captions, latent_cache.cache_root(cfg),
                                                    cpu=use_cpu(cfg.denoiser.train))
        else:
            directory, tm = stage_dir / "tokenizer", cfg.denoiser.text_model
            with state.main_process_first():  # the main process learns and writes it, the others read it
                if state.is_main_process:
                    hf_tokenizer = build_clip_tokenizer(captions, tm.vocab_size, tm.max_length, directory)
                else:
                    from transformers import CLIPTokenizer

                    hf_tokenizer = CLIPTokenizer.from_pretrained(str(directory))
            tokenizer = PromptTokenizer(hf_tokenizer)
            tokenizer.check(captions, complete=True)
        prompts = class_prompts(info.captions, info.num_classes)
        labels = list(range(info.num_classes)) if prompts else None
        if prompts is None:
            prompts = list(dict.fromkeys(captions))
        return cls(tokenizer, cfg.denoiser.diffusion.cond_dropout, cfg.denoiser.guidance_scale, prompts, labels, frozen,
                   embeddings)

    def build_model(self, cfg: RunConfig, vae) -> nn.Module:
        self.transformer = cfg.denoiser.model.type == "dit"
        if self.frozen_encoder is not None:
            return build_text_denoiser(cfg.denoiser.model, vae, hidden_size(self.frozen_encoder))
        text_encoder = build_text_encoder(cfg.denoiser.text_model, self.tokenizer.tokenizer)
        network = build_text_denoiser(cfg.denoiser.model, vae, text_encoder.config.hidden_size)
        return TextConditionedUNet(network, text_encoder)

    def attach(self, device: torch.device) -> None:
        if self.frozen_encoder is not None:
            self.frozen_encoder.to(device)

    def model_output(self, model, noisy, timesteps, batch: dict, train: bool) -> torch.Tensor:
        captions = list(batch["caption"])
        if train and self.cond_dropout > 0:
            dropped = (torch.rand(len(captions), device=noisy.device) < self.cond_dropout).tolist()
            captions = ["" if d else c for c, d in zip(captions, dropped)]
        if self.frozen_encoder is not None:
            context = self.embeddings(captions).to(noisy.device)
            return denoiser_output(model, noisy, timesteps, encoder_hidden_states=context, transformer=self.transformer)
        return model(noisy, timesteps, self.tokenizer(captions).to(noisy.device))

    def make_pipeline(self, model, vae, scheduler):
        # The scale of the grids and evaluations travels in model_index.json (text_to_image.TEXT_GUIDANCE_KEY).
        if self.frozen_encoder is not None:
            return make_text_pipeline(vae, model, self.frozen_encoder, self.tokenizer.tokenizer, scheduler,
                                      self.guidance_scale)
        return make_text_pipeline(vae, model.denoiser, model.text_encoder, self.tokenizer.tokenizer, scheduler,
                                  self.guidance_scale)

    def sample_grid(self, pipe, n: int, seed: int, steps: int):
        """One row per prompt (per class for a caption template), n // prompts images each (at least one)."""
        prompts = self.prompts[:MAX_GRID_PROMPTS]
        per_prompt = max(1, n // len(prompts))
        images = pipe(prompt=[p for p in prompts for _ in range(per_prompt)], guidance_scale=self.guidance_scale,
                      generator=torch.Generator().manual_seed(seed), num_inference_steps=steps).images
        return image_grid(images, cols=per_prompt)

    def sample_plan(self, guidance_scale: float | None = None):
        from ldm.eval.conditional import SamplePlan

        g = self.guidance_scale if guidance_scale is None else guidance_scale
        return SamplePlan.text(self.prompts, self.prompt_labels, g)
