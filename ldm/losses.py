"""Losses as functions of explicit inputs, each returning (loss, logs).

The autoencoder loss follows the LDM paper's KL autoencoder (taming-transformers' LPIPSWithDiscriminator):

    L = rec + kl_weight * KL + disc_factor * lambda * L_G          (autoencoder)
    rec = pixel loss + chroma_weight * block-mean chroma MSE + perceptual_weight * LPIPS + ssim_weight * (1 - SSIM)
          + spectral_weight * spectral distance
    L_D = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))     (discriminator, hinge)

with lambda = disc_weight * ||grad_last rec|| / ||grad_last L_G|| (the adaptive weight of Esser et al. 2021).
Both are returned as one sum so a single backward pass trains both networks: the generator term sees the
discriminator with its parameters frozen, and the discriminator term sees detached reconstructions, so each
network receives only its own gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ldm.config import VAELossConfig

Logs = dict[str, torch.Tensor]


def reconstruction_loss(inputs: torch.Tensor, reconstructions: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-element reconstruction loss, unreduced."""
    if kind == "l1":
        return (inputs - reconstructions).abs()
    return (inputs - reconstructions) ** 2


def ssim_loss(inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """1 - SSIM (Wang et al. 2004) per image, on the [0, 1] scale; Gaussian window 11 (sigma 1.5), smaller on tiny
    images, as ldm.eval.metrics.ssim measures it. SSIM compares local means, contrasts and structure, so it rewards
    keeping local contrast (texture) that an L1 average would blur away."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    size = min(inputs.shape[-2:])
    kernel_size = min(11, size if size % 2 else size - 1)
    x, y = (inputs.float() + 1) / 2, (reconstructions.float() + 1) / 2
    ssim = structural_similarity_index_measure(y, x, data_range=1.0, kernel_size=kernel_size,
                                               sigma=1.5 * kernel_size / 11, reduction="none")
    return 1.0 - ssim


# Two orthonormal opponent-colour axes of RGB, both orthogonal to the gray axis (1, 1, 1): red-green and
# yellow-blue. A pixel's projection on them is its chroma; any gray has none.
_CHROMA_AXES = torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]) / torch.tensor([[2.0 ** 0.5], [6.0 ** 0.5]])


def chroma_loss(inputs: torch.Tensor, reconstructions: torch.Tensor, block: int = 1) -> torch.Tensor:
    """Mean squared error of the block-mean chroma (the RGB difference projected on the two opponent axes and
    averaged over `block` x `block` pixel blocks), per image.

    Why a squared term beside the L1 pixel loss: the L1 gradient of a pixel is the sign of its error, so a gray
    reconstruction of a saturated object pulls towards its colour no harder than an almost-white background pixel
    pulls towards white. On objects on a plain background an L1-only autoencoder settles on gray shapes and stays
    there (docs/colour.md: chroma kept 0.08-0.11 of the input's after 1,000 steps, three seeds); the squared term's
    gradient grows with the colour error, and the same runs keep 0.80-0.91 of it. Gray data has no chroma: RGB only.

    Why block means: the gray resting point is a missing colour per region, not per pixel. Squaring the error of
    each block's mean colour (one block per latent pixel by default) pulls regions out of gray and leaves the
    pixel-level detail to L1, whose sharpness the recipes were tuned on; the per-pixel squared error competed with
    it and cost photographs up to 0.9 dB of PSNR at configs/digits.yaml's budget, the block means gain 0.7 dB
    there and keep more colour (docs/colour.md).
    """
    axes = _CHROMA_AXES.to(inputs.device, torch.float32)
    diff = torch.einsum("ij,njhw->nihw", axes, inputs.float() - reconstructions.float())
    if block > 1:  # ceil_mode and no padding in the mean: sizes the block does not divide keep their edge pixels
        diff = F.avg_pool2d(diff, block, ceil_mode=True, count_include_pad=False)
    return diff.square().mean(dim=(1, 2, 3))


def spectral_loss(inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Mean |log(1 + |F(x)|) - log(1 + |F(x_rec)|)| over the 2-D amplitude spectra, per image.

    An amplitude spectrum ignores where a frequency sits (the pixel loss takes care of that) and measures how much of
    it there is: a reconstruction that smooths texture away loses high-frequency amplitude and pays for it here even
    when the texture cannot be placed exactly. The log evens out the 1/f fall-off of natural images, so the fine
    scales count as much as the coarse ones (as in the focal frequency loss of Jiang et al. 2021, without its
    per-frequency weighting).
    """
    amplitude = [torch.fft.rfft2(t.float(), norm="ortho").abs() for t in (inputs, reconstructions)]
    return (torch.log1p(amplitude[0]) - torch.log1p(amplitude[1])).abs().mean(dim=(1, 2, 3))


def kl_per_pixel(posterior, num_pixels: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent elements, averaged over the batch, divided by the pixel count.

    LDM sums both the reconstruction and the KL over elements; dividing both by the pixel count keeps their ratio
    (so kl_weight=1e-6 means what it means in the paper) while the loss stays O(1).
    """
    return posterior.kl().mean() / num_pixels


def adaptive_generator_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float
) -> torch.Tensor:
    """lambda = disc_weight * ||d rec / d w_last|| / (||d L_G / d w_last|| + 1e-4), clamped to [0, 1e4], no grad."""
    rec_grads = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(rec_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vae_loss(
    cfg: VAELossConfig,
    inputs: torch.Tensor,
    reconstructions: torch.Tensor,
    posterior,
    step: int,
    last_layer: torch.Tensor | None = None,
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    discriminator: torch.nn.Module | None = None,
    discriminator_for_generator: torch.nn.Module | None = None,
    disc_start: float | None = None,
    chroma_block: int = 1,
) -> tuple[torch.Tensor, Logs]:
    """The autoencoder (+ discriminator) loss of one batch.

    perceptual: LPIPS distance (per sample) or None. It runs WITH gradients: it is a training signal.
    discriminator: the (possibly DDP-wrapped) module trained by the hinge term.
    discriminator_for_generator: the same network, unwrapped, used for the generator term; its parameters are
        frozen during that call so the generator term does not train it.
    disc_start: the step from which the adversarial terms count (default: cfg.disc_start, read as a step).
    chroma_block: the chroma term's block size where cfg.chroma_block is null (the trainer passes the autoencoder's
        downsampling factor).
    """
    # 1. Pixel (+ perceptual) reconstruction term.
    rec = reconstruction_loss(inputs, reconstructions, cfg.reconstruction).mean()
    logs: Logs = {"rec_loss": rec.detach()}
    if cfg.chroma_weight > 0 and inputs.shape[1] == 3:
        c_loss = chroma_loss(inputs, reconstructions, cfg.chroma_block or chroma_block).mean()
        rec = rec + cfg.chroma_weight * c_loss
        logs["chroma_loss"] = c_loss.detach()
    if cfg.perceptual_weight > 0:
        if perceptual is None:
            raise ValueError("vae.loss.perceptual_weight > 0 but no LPIPS network was given")
        p_loss = perceptual(inputs, reconstructions).mean()
        rec = rec + cfg.perceptual_weight * p_loss
        logs["perceptual_loss"] = p_loss.detach()
    # Offline perceptual terms: no weights to download.
    if cfg.ssim_weight > 0:
        s_loss = ssim_loss(inputs, reconstructions).mean()
        rec = rec + cfg.ssim_weight * s_loss
        logs["ssim_loss"] = s_loss.detach()
    if cfg.spectral_weight > 0:
        f_loss = spectral_loss(inputs, reconstructions).mean()
        rec = rec + cfg.spectral_weight * f_loss
        logs["spectral_loss"] = f_loss.detach()
    # 2. KL regulariser.
    kl = kl_per_pixel(posterior, inputs[0].numel())
    loss = rec + cfg.kl_weight * kl
    logs["kl_loss"] = kl.detach()
    # 3. Adversarial terms, once the discriminator has started.
    if cfg.disc_weight > 0 and step >= (cfg.disc_start if disc_start is None else disc_start):
        if discriminator is None or last_layer is None:
            raise ValueError("vae.loss.disc_weight > 0 needs the discriminator and the decoder's last layer")
        gen_disc = discriminator_for_generator or discriminator
        gen_disc.requires_grad_(False)
        g_loss = -gen_disc(reconstructions).mean()
        gen_disc.requires_grad_(True)
        d_weight = adaptive_generator_weight(rec, g_loss, last_layer, cfg.disc_weight)
        # One call on real + fake (GroupNorm keeps samples independent): a DDP-wrapped module must run forward
        # once per backward, or its gradient hooks fire twice per parameter.
        logits_real, logits_fake = discriminator(torch.cat([inputs.detach(), reconstructions.detach()])).chunk(2)
        d_loss = hinge_discriminator_loss(logits_real, logits_fake)
        loss = loss + d_weight * g_loss + d_loss
        logs.update(g_loss=g_loss.detach(), d_weight=d_weight, d_loss=d_loss.detach())
    return loss, logs


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet learns to predict: the noise (epsilon) or the velocity v = alpha_t * eps - sigma_t * x0."""
    if noise_scheduler.config.prediction_type == "epsilon":
        return noise
    return noise_scheduler.get_velocity(latents, noise, timesteps)


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler,
    snr_gamma: float | None = None,
) -> tuple[torch.Tensor, Logs]:
    """Mean squared error, optionally with min-SNR-gamma weighting (Hang et al. 2023) per sample."""
    mse = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        loss = mse.mean()
    else:
        # w_t = min(SNR_t, gamma) / SNR_t for epsilon targets, / (SNR_t + 1) for v targets.
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=snr_gamma)
        weight = weight / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weight / snr
        loss = (mse * weight).mean()
    return loss, {"mse": mse.mean().detach()}
