"""Text encoders for text-conditioned UNets: a small CLIPTextModel trained from scratch, or a pretrained frozen one.

Prompts are turned into the UNet's cross-attention context exactly as diffusers' StableDiffusionPipeline does
(`encode_prompt` without clip_skip): token ids padded to `tokenizer.model_max_length`, truncated beyond it, no
attention mask (unless the encoder's config asks for one), and the encoder's last hidden state. Training on the same
context is what makes the saved model a stock Stable Diffusion pipeline.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedModel, T5EncoderModel

from ldm.config import TextModelConfig

# model_type in a transformers config -> the encoder class that Stable Diffusion pipelines run.
ENCODER_CLASSES = {"clip": CLIPTextModel, "clip_text_model": CLIPTextModel, "t5": T5EncoderModel,
                   "umt5": T5EncoderModel, "mt5": T5EncoderModel}


class CaptionTruncationWarning(UserWarning):
    """Captions longer than the tokenizer's maximum were cut."""


def build_text_encoder(cfg: TextModelConfig, tokenizer) -> CLIPTextModel:
    """A CLIPTextModel (CLIP's architecture, smaller) over `tokenizer`'s vocabulary, randomly initialised."""
    end = tokenizer.eos_token_id
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=cfg.hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=end, pad_token_id=end,
    )
    return CLIPTextModel(config)


def _component_dirs(name_or_path: str) -> tuple[str, dict, dict]:
    """(source, encoder kwargs, tokenizer kwargs): a Stable Diffusion folder/repo keeps them in sub-folders."""
    path = Path(name_or_path)
    if (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
        return name_or_path, {"subfolder": "text_encoder"}, {"subfolder": "tokenizer"}
    return name_or_path, {}, {}


def load_pretrained_text_encoder(name_or_path: str) -> tuple[PreTrainedModel, object]:
    """(frozen encoder in eval mode, tokenizer) of a CLIP or T5 model: a Hub id or a local folder.

    A folder may hold both directly or in `text_encoder/` and `tokenizer/` sub-folders (a Stable Diffusion model).
    """
    source, encoder_kwargs, tokenizer_kwargs = _component_dirs(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, **encoder_kwargs)
        model_type = config.model_type
        if model_type not in ENCODER_CLASSES:
            raise ValueError(f"denoiser.text_encoder={name_or_path!r} is a {model_type!r} model; expected a CLIP text "
                             "model or a T5 encoder (e.g. openai/clip-vit-large-patch14, google/t5-v1_1-base)")
        encoder = ENCODER_CLASSES[model_type].from_pretrained(source, **encoder_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    except OSError as e:
        raise ValueError(f"cannot load denoiser.text_encoder={name_or_path!r} (a Hub id needs the network once; a "
                         f"local folder needs its config, weights and tokenizer files): {e}") from e
    return encoder.requires_grad_(False).eval(), tokenizer


def hidden_size(encoder: PreTrainedModel) -> int:
    """Width of the encoder's last hidden state: the UNet's cross_attention_dim."""
    config = encoder.config
    return getattr(config, "hidden_size", None) or config.d_model  # CLIP: hidden_size; T5: d_model


class PromptTokenizer:
    """Captions -> padded token ids (B, model_max_length), as StableDiffusionPipeline tokenizes prompts; the first
    time captions are too long it warns once (CaptionTruncationWarning) and then truncates silently."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.max_length = tokenizer.model_max_length
        self.warned = False
        self.checked_all = False  # every caption it will see was checked up front: batches need no check

    def check(self, captions: list[str], complete: bool = False) -> int:
        """Count the captions longer than the maximum and warn about them (once per tokenizer); `complete`: these
        are all the captions there are, so later batches are not checked again."""
        self.checked_all = self.checked_all or complete
        lengths = [len(ids) for ids in self.tokenizer(list(captions), truncation=False, verbose=False).input_ids]
        too_long = [(n, c) for n, c in zip(lengths, captions) if n > self.max_length]
        if too_long and not self.warned:
            self.warned = True
            longest, example = max(too_long)
            warnings.warn(
                f"{len(too_long)} of {len(captions)} captions are longer than the tokenizer's maximum of "
                f"{self.max_length} tokens and are truncated (longest: {longest} tokens: {example[:80]!r}). Raise "
                "denoiser.text_model.max_length (from-scratch encoder) or shorten the captions.",
                CaptionTruncationWarning, stacklevel=2)
        return len(too_long)

    def tokens(self, captions: list[str]):
        """input_ids and attention_mask (a transformers BatchEncoding of tensors)."""
        if not (self.warned or self.checked_all):
            self.check(captions)
        return self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt")

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return self.tokens(captions).input_ids


def encode_prompts(encoder: PreTrainedModel, tokens) -> torch.Tensor:
    """The UNet's cross-attention context: the encoder's last hidden state (B, L, D), as Stable Diffusion uses it
    (the attention mask only for encoders whose config sets use_attention_mask)."""
    mask = tokens.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
    return encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]
