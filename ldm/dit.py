"""The transformer backbone (`denoiser.model.type: dit`): diffusers' latent transformers, sized by the config and
initialised as their papers do.

  unconditional, class, super-resolution   DiTTransformer2DModel (Peebles & Xie 2023): the latents cut into
                                           patch_size² patches, one token each, `num_layers` blocks whose LayerNorms
                                           are scaled, shifted and gated by the timestep + class embedding (adaLN-Zero)
  text                                     PixArtTransformer2DModel (Chen et al. 2023, PixArt-α): the same blocks with
                                           one shared adaLN ("adaLN-single") and a cross-attention layer to the text
                                           encoder's per-token states

Why PixArt's cross-attention for text rather than SD3's joint attention (SD3Transformer2DModel): it is DiT's block
with cross-attention added, so the two variants differ only in how the condition enters; it reads the text
encoder's token states as they are (a projection to the width), where SD3 also needs a pooled vector that a T5
encoder does not give; and its attention runs over the image tokens alone, where joint attention runs over image +
77 text tokens in every layer, which at ldm's small latent grids (16-256 tokens) is most of the cost.

Fixed variance: out_channels = the latent channels. DiT's paper (and DiTTransformer2DModel's default) predicts
Σ too (2x the channels), trained with improved DDPM's variational bound term. ldm's objectives train the mean
alone (ε or v by MSE; a flow's velocity), and its samplers (DDIM, DPM-Solver++, Euler, flow) take no variance, so a
second half of the output would never be trained or used; diffusers' DiTPipeline splits it off only when it is there.

Classes: DiTTransformer2DModel always embeds a class; its LabelEmbedding has `num_embeds_ada_norm` + 1 rows, the
last being the null class of classifier-free guidance. An unconditional DiT has one class (id 0, always given,
`ldm.pipelines.pipeline_common.denoiser_output`). A class DiT built for diffusers' DiTPipeline has 1000 (that
pipeline's null class is the hard-coded id 1000, ImageNet's), of which the data's classes use the first; whether it
can be is `ldm.pipelines.pipeline_common.dit_pipeline_problem`'s to say.
"""

from __future__ import annotations

from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from ldm.config import DenoiserModelConfig


def build_dit(model_cfg: DenoiserModelConfig, channels: int, size: int, class_embeddings: int = 1,
              low_res_channels: int = 0) -> DiTTransformer2DModel:
    """A DiT over `size`x`size` latents of `channels` channels, initialised as DiT's `initialize_weights`.

    class_embeddings: `num_embeds_ada_norm`, the null class's id (1 for an unconditional model, the number of
    classes, or DiTPipeline's 1000). low_res_channels: super-resolution, the low-res image concatenated with the
    latents at the input (the output stays the latents').
    """
    heads = model_cfg.num_attention_heads
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=model_cfg.width // heads,
        in_channels=channels + low_res_channels,
        out_channels=channels,  # fixed variance (see the module docstring)
        num_layers=model_cfg.num_layers,
        dropout=model_cfg.dropout,
        sample_size=size,
        patch_size=model_cfg.patch_size,
        num_embeds_ada_norm=class_embeddings,
    )
    no_label_dropout(model)
    _init_dit(model)
    return model


def build_text_dit(model_cfg: DenoiserModelConfig, channels: int, size: int,
                   caption_channels: int) -> PixArtTransformer2DModel:
    """A PixArt-α transformer over the latents, cross-attending to text encoder states of width
    `caption_channels` (projected to the transformer's width first, as PixArt projects T5's)."""
    heads = model_cfg.num_attention_heads
    model = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=model_cfg.width // heads,
        in_channels=channels,
        out_channels=channels,  # fixed variance (see the module docstring)
        num_layers=model_cfg.num_layers,
        dropout=model_cfg.dropout,
        cross_attention_dim=model_cfg.width,
        sample_size=size,
        patch_size=model_cfg.patch_size,
        caption_channels=caption_channels,
        # PixArt's resolution/aspect-ratio embedding is for multi-aspect training; diffusers turns it on for any
        # 128-wide latent grid, which would then need extra inputs at every call.
        use_additional_conditions=False,
    )
    _init_pixart(model)
    return model


def no_label_dropout(model: DiTTransformer2DModel) -> None:
    """Turn off the label dropout diffusers hard-codes in every block's class embedding (p = 0.1 in train mode).

    Condition dropout is `denoiser.diffusion.cond_dropout`'s job, applied once per example by the training task; the
    built-in one would drop labels a second time, in each block independently, and draw from the global RNG."""
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def _xavier_linears(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _init_patch_embedding(model: nn.Module) -> None:
    # The patch embedding is a linear map of each flattened patch: initialised as a Linear, not a Conv2d.
    weight = model.pos_embed.proj.weight.data
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.zeros_(model.pos_embed.proj.bias)


def _init_dit(model: DiTTransformer2DModel) -> None:
    """facebookresearch/DiT's `initialize_weights`: Xavier linears, N(0, 0.02) timestep MLP and class table, and the
    "Zero" of adaLN-Zero: every block's modulation (so its gates) and the output layer start at 0, so each block
    starts as the identity and the network's first prediction is 0."""
    _xavier_linears(model)
    _init_patch_embedding(model)
    for block in model.transformer_blocks:
        embedding = block.norm1.emb  # diffusers keeps one timestep + class embedding per block
        nn.init.normal_(embedding.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedding.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def _init_pixart(model: PixArtTransformer2DModel) -> None:
    """PixArt-α's `initialize_weights`: as DiT's, with the caption projection N(0, 0.02) and, in place of the zeroed
    modulation (adaLN-single's per-block tables stay as diffusers draws them), every cross-attention output and
    the output layer at 0."""
    _xavier_linears(model)
    _init_patch_embedding(model)
    timestep = model.adaln_single.emb.timestep_embedder
    for layer in (timestep.linear_1, timestep.linear_2, model.adaln_single.linear,
                  model.caption_projection.linear_1, model.caption_projection.linear_2):
        nn.init.normal_(layer.weight, std=0.02)
    for layer in [block.attn2.to_out[0] for block in model.transformer_blocks] + [model.proj_out]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)

