"""Build the diffusers models of a run from its config: the KL autoencoder, the latent denoiser (a UNet here, a
transformer in `ldm.dit`, `build_denoiser` picks by denoiser.model.type), the noise scheduler, and the patch
discriminator of the autoencoder's adversarial loss."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import nn

from ldm.config import ConfigError, DenoiserModelConfig, DiffusionConfig, VAEModelConfig


def vae_downsampling_factor(model_cfg: VAEModelConfig) -> int:
    """AutoencoderKL halves the resolution in every level but the last."""
    return 2 ** (len(model_cfg.block_out_channels) - 1)


def build_vae(model_cfg: VAEModelConfig, in_channels: int, resolution: int) -> AutoencoderKL:
    levels = len(model_cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(model_cfg.block_out_channels),
        layers_per_block=model_cfg.layers_per_block,
        latent_channels=model_cfg.latent_channels,
        norm_num_groups=model_cfg.norm_num_groups,
        sample_size=resolution,
        # Placeholder until training measures 1/std of the latents; 1.0 keeps encode/decode exact inverses meanwhile.
        scaling_factor=1.0,
    )


def latent_shape(vae: AutoencoderKL) -> tuple[int, int]:
    """(channels, height/width) of the latents this VAE produces for its training resolution."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, vae.config.sample_size // factor


def checked_latent_shape(model_cfg: DenoiserModelConfig, vae: AutoencoderKL) -> tuple[int, int]:
    """The VAE's (latent channels, latent size), checked against the sizes the denoiser config gives."""
    channels, size = latent_shape(vae)
    if model_cfg.in_channels is not None and model_cfg.in_channels != channels:
        raise ConfigError(
            f"denoiser.model.in_channels={model_cfg.in_channels} does not match the VAE's latent_channels={channels}; "
            "remove the key (it is taken from the VAE) or train a matching VAE"
        )
    if model_cfg.sample_size is not None and model_cfg.sample_size != size:
        raise ConfigError(
            f"denoiser.model.sample_size={model_cfg.sample_size} does not match the VAE's latent size {size} "
            f"({vae.config.sample_size} px / downsampling {vae.config.sample_size // size}); remove the key or fix it"
        )
    if model_cfg.type == "dit":
        if size % model_cfg.patch_size:
            raise ConfigError(
                f"denoiser.model.patch_size={model_cfg.patch_size} does not divide the VAE's {size}x{size} latents "
                f"({vae.config.sample_size} px / downsampling {vae.config.sample_size // size}); use a divisor of "
                f"{size}")
        return channels, size
    levels = len(model_cfg.block_out_channels)
    if size % 2 ** (levels - 1):
        raise ConfigError(
            f"denoiser.model.block_out_channels: {levels} levels downsample the {size}x{size} latents "
            f"by {2 ** (levels - 1)}, which does not divide {size}; use fewer levels"
        )
    return channels, size


def build_unet(model_cfg: DenoiserModelConfig, vae: AutoencoderKL, num_classes: int | None = None,
               low_res_channels: int = 0) -> UNet2DModel:
    """A UNet2DModel over the VAE's latent space; sizes given in the config must agree with the VAE.

    num_classes: class-conditional model: a learned embedding per class plus one for the null class (id
    num_classes), added to the timestep embedding; classifier-free guidance contrasts the two (Ho & Salimans 2022).
    low_res_channels: super-resolution (LDM-SR): the low-res image's channels, concatenated with the latents at the
    input (in_channels = latent + low_res_channels; the output stays the latents' noise).
    """
    channels, size = checked_latent_shape(model_cfg, vae)
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in model_cfg.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(model_cfg.attention))
    return UNet2DModel(
        sample_size=size,
        in_channels=channels + low_res_channels,
        out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(model_cfg.block_out_channels),
        layers_per_block=model_cfg.layers_per_block,
        attention_head_dim=model_cfg.attention_head_dim,
        norm_num_groups=model_cfg.norm_num_groups,
        dropout=model_cfg.dropout,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )


def build_denoiser(model_cfg: DenoiserModelConfig, vae: AutoencoderKL, num_classes: int | None = None,
                   low_res_channels: int = 0, class_embeddings: int | None = None) -> nn.Module:
    """The network of denoiser.model.type over the VAE's latent space: `build_unet`, or a DiT (`ldm.dit.build_dit`)
    with `class_embeddings` (the null class's id: DiTPipeline's 1000, or by default the number of classes, 1 for an
    unconditional model). Sizes given in the config must agree with the VAE (ConfigError naming the key)."""
    if model_cfg.type == "unet":
        return build_unet(model_cfg, vae, num_classes, low_res_channels)
    from ldm.dit import build_dit

    channels, size = checked_latent_shape(model_cfg, vae)
    return build_dit(model_cfg, channels, size, class_embeddings or num_classes or 1, low_res_channels)


def build_text_denoiser(model_cfg: DenoiserModelConfig, vae: AutoencoderKL, cross_attention_dim: int) -> nn.Module:
    """The text-conditioned network of denoiser.model.type: `build_text_unet`, or PixArt's cross-attention
    transformer (`ldm.dit.build_text_dit`), reading text encoder states of width `cross_attention_dim`."""
    if model_cfg.type == "unet":
        return build_text_unet(model_cfg, vae, cross_attention_dim)
    from ldm.dit import build_text_dit

    channels, size = checked_latent_shape(model_cfg, vae)
    return build_text_dit(model_cfg, channels, size, cross_attention_dim)


def build_text_unet(model_cfg: DenoiserModelConfig, vae: AutoencoderKL,
                    cross_attention_dim: int) -> UNet2DConditionModel:
    """A UNet2DConditionModel over the VAE's latent space, cross-attending to text encoder states of width
    `cross_attention_dim` at the levels where denoiser.model.attention is on (as Stable Diffusion's UNet does)."""
    channels, size = checked_latent_shape(model_cfg, vae)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in model_cfg.attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(model_cfg.attention))
    # UNet2DConditionModel reads `attention_head_dim` as the number of heads (a naming slip diffusers keeps for
    # compatibility), so heads per level = channels / head width.
    heads = tuple(max(1, c // model_cfg.attention_head_dim) for c in model_cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(model_cfg.block_out_channels),
        layers_per_block=model_cfg.layers_per_block,
        attention_head_dim=heads,
        norm_num_groups=model_cfg.norm_num_groups,
        dropout=model_cfg.dropout,
        cross_attention_dim=cross_attention_dim,
    )


def build_noise_scheduler(diffusion_cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=diffusion_cfg.num_train_timesteps,
        beta_schedule=diffusion_cfg.beta_schedule,
        beta_start=diffusion_cfg.beta_start,
        beta_end=diffusion_cfg.beta_end,
        prediction_type=diffusion_cfg.prediction_type,
        # Latents are not bounded like pixels, so the sampler must not clip its x0 estimate to [-1, 1].
        clip_sample=False,
    )


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017) as in the LDM/taming autoencoder loss: one logit per patch.

    GroupNorm replaces taming's BatchNorm so the logits of a sample do not depend on the rest of its batch (and
    multi-process runs need no synchronised batch statistics).
    """

    def __init__(self, in_channels: int, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for i in range(1, num_layers + 1):
            out = base_channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride, 1, bias=False), nn.GroupNorm(32, out), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(_init_discriminator_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _init_discriminator_weights(module: nn.Module) -> None:
    # DCGAN initialisation, as taming's NLayerDiscriminator.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
