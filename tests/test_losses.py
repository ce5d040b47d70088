import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr

from ldm.config import VAELossConfig
from ldm.losses import (
    adaptive_generator_weight,
    diffusion_loss,
    diffusion_target,
    hinge_discriminator_loss,
    kl_per_pixel,
    spectral_loss,
    ssim_loss,
    vae_loss,
)
from ldm.models import PatchDiscriminator


def posterior(mean: float, logvar: float, shape=(2, 4, 4, 4)) -> DiagonalGaussianDistribution:
    params = torch.cat([torch.full(shape, mean), torch.full(shape, logvar)], dim=1)
    return DiagonalGaussianDistribution(params)


def test_kl_is_zero_for_standard_normal_and_matches_closed_form():
    assert kl_per_pixel(posterior(0.0, 0.0), num_pixels=10).item() == pytest.approx(0.0, abs=1e-7)
    # KL(N(m, s^2) || N(0, 1)) = 0.5 (m^2 + s^2 - 1 - log s^2) per element; 4*4*4 elements per sample.
    m, logvar = 0.5, 0.2
    expected = 0.5 * (m**2 + torch.exp(torch.tensor(logvar)) - 1 - logvar) * 64 / 16
    assert kl_per_pixel(posterior(m, logvar), num_pixels=16).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("kind, expected", [("l1", 0.25), ("l2", 0.0625)])
def test_reconstruction_terms(kind, expected):
    x = torch.zeros(2, 1, 4, 4)
    cfg = VAELossConfig(reconstruction=kind, kl_weight=0.0)
    loss, logs = vae_loss(cfg, x, x + 0.25, posterior(0.0, 0.0), step=0)
    assert loss.item() == pytest.approx(expected)
    assert logs["rec_loss"].item() == pytest.approx(expected)


def test_kl_weight_scales_the_kl_term():
    x = torch.zeros(2, 1, 4, 4)
    post = posterior(1.0, 0.5)
    base, logs = vae_loss(VAELossConfig(kl_weight=0.0), x, x, post, step=0)
    weighted, _ = vae_loss(VAELossConfig(kl_weight=1e-2), x, x, post, step=0)
    assert base.item() == pytest.approx(0.0)
    assert weighted.item() == pytest.approx(1e-2 * logs["kl_loss"].item(), rel=1e-5)


def test_perceptual_term_is_added_and_trains():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    recon = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    distance = lambda a, b: ((a - b) ** 2).flatten(1).sum(1)
    cfg = VAELossConfig(kl_weight=0.0, perceptual_weight=2.0, lpips_weights="unused", chroma_weight=0.0)
    loss, logs = vae_loss(cfg, x, recon, posterior(0.0, 0.0), step=0, perceptual=distance)
    expected_p = distance(x, recon).mean()
    assert logs["perceptual_loss"].item() == pytest.approx(expected_p.item(), rel=1e-5)
    loss.backward()
    # The gradient holds the perceptual part: d/d recon of 2 * mean_n sum (x - r)^2 = -4 (x - r) / N.
    l1_grad = torch.sign(recon.detach() - x) / x.numel()
    assert torch.allclose(recon.grad - l1_grad, 4 * (recon.detach() - x) / 2, atol=1e-5)


def blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 box blur (circular), the loss of fine detail an L1-trained autoencoder shows."""
    return sum(torch.roll(x, (dy, dx), dims=(-2, -1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9


def test_offline_perceptual_terms_punish_lost_texture():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1  # white noise: all texture
    assert ssim_loss(x, x).abs().max().item() < 1e-5 and spectral_loss(x, x).abs().max().item() == 0.0
    assert (ssim_loss(x, blur(x)) > 0.3).all() and (spectral_loss(x, blur(x)) > 0.1).all()
    # The amplitude spectrum ignores where the texture sits: a shifted copy costs nothing, unlike the pixel loss.
    shifted = torch.roll(x, (3, 5), dims=(-2, -1))
    assert spectral_loss(x, shifted).abs().max().item() < 1e-5 and (x - shifted).abs().mean() > 0.5


def test_offline_perceptual_terms_are_weighted_into_the_loss():
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    post = posterior(0.0, 0.0)
    base, _ = vae_loss(VAELossConfig(kl_weight=0.0), x, blur(x), post, step=0)
    loss, logs = vae_loss(VAELossConfig(kl_weight=0.0, ssim_weight=0.5, spectral_weight=2.0), x, blur(x), post, step=0)
    expected = base + 0.5 * ssim_loss(x, blur(x)).mean() + 2.0 * spectral_loss(x, blur(x)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(logs) >= {"ssim_loss", "spectral_loss"}


def test_adaptive_weight_is_ratio_of_gradient_norms():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = (3 * w).sum()  # gradient (3, 3)
    g = (w**2).sum()  # gradient (2, 4)
    weight = adaptive_generator_weight(rec, g, w, disc_weight=0.5)
    expected = 0.5 * (18**0.5) / (20**0.5 + 1e-4)
    assert weight.item() == pytest.approx(expected, rel=1e-5)
    assert not weight.requires_grad


def test_hinge_loss_values():
    assert hinge_discriminator_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0
    assert hinge_discriminator_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(1.0)


def test_discriminator_waits_for_disc_start():
    torch.manual_seed(0)
    disc = PatchDiscriminator(1, num_layers=1)
    x = torch.rand(2, 1, 16, 16)
    layer = torch.nn.Parameter(torch.ones(1))
    recon = x * layer
    cfg = VAELossConfig(kl_weight=0.0, disc_weight=0.5, disc_start=10)
    _, logs = vae_loss(cfg, x, recon, posterior(0.0, 0.0), step=9, last_layer=layer, discriminator=disc)
    assert "d_loss" not in logs
    _, logs = vae_loss(cfg, x, recon, posterior(0.0, 0.0), step=10, last_layer=layer, discriminator=disc)
    assert {"g_loss", "d_loss", "d_weight"} <= logs.keys()


def test_each_network_gets_only_its_own_gradients():
    """One backward of the summed loss: the discriminator learns only from the hinge term."""
    torch.manual_seed(0)
    disc = PatchDiscriminator(1, num_layers=1)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    layer = torch.nn.Parameter(torch.full((1,), 0.9))
    recon = x * layer
    cfg = VAELossConfig(kl_weight=0.0, disc_weight=0.5, disc_start=0)
    loss, logs = vae_loss(cfg, x, recon, posterior(0.0, 0.0), step=0, last_layer=layer, discriminator=disc)
    loss.backward()
    combined = [p.grad.clone() for p in disc.parameters()]
    # The same discriminator gradient from the hinge term alone.
    disc.zero_grad()
    hinge_discriminator_loss(disc(x), disc(recon.detach())).backward()
    for got, want in zip(combined, [p.grad for p in disc.parameters()]):
        assert torch.allclose(got, want, atol=1e-6)
    # The autoencoder side gets the generator term (d_weight * g_loss) on top of the reconstruction term.
    assert all(p.requires_grad for p in disc.parameters())
    assert layer.grad is not None and logs["d_weight"].item() > 0


def test_v_prediction_target_and_min_snr_weighting():
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    z0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([1, 100, 500, 999])
    target = diffusion_target(sched, z0, noise, t)
    alpha_bar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * z0, atol=1e-5)

    pred = target + 0.1
    plain, _ = diffusion_loss(pred, target, t, sched)
    assert plain.item() == pytest.approx(0.01, rel=1e-4)
    weighted, _ = diffusion_loss(pred, target, t, sched, snr_gamma=5.0)
    snr = compute_snr(sched, t)
    expected = (0.01 * torch.clamp(snr, max=5.0) / (snr + 1)).mean()
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-4)


def test_chroma_term_sees_colour_errors_only_and_only_on_rgb():
    from ldm.losses import chroma_loss

    x = torch.rand(2, 3, 8, 8) * 2 - 1
    gray_shift = x + 0.3  # the same offset on every channel: a lightness error, no chroma error
    assert chroma_loss(x, gray_shift).abs().max().item() < 1e-10
    red_shift = x + torch.tensor([0.3, 0.0, 0.0]).view(1, 3, 1, 1)
    # |projection of (0.3, 0, 0) on the two unit opponent axes|^2 = 0.09 * (1/2 + 1/6), averaged over 2 axes.
    assert chroma_loss(x, red_shift) == pytest.approx(torch.full((2,), 0.09 * (1 / 2 + 1 / 6) / 2), rel=1e-5)
    cfg = VAELossConfig(kl_weight=0.0, chroma_weight=4.0)
    with_term, logs = vae_loss(cfg, x, red_shift, posterior(0.0, 0.0), step=0)
    without, _ = vae_loss(VAELossConfig(kl_weight=0.0, chroma_weight=0.0), x, red_shift, posterior(0.0, 0.0), step=0)
    assert (with_term - without).item() == pytest.approx(4 * logs["chroma_loss"].item(), rel=1e-5)
    gray = torch.zeros(2, 1, 8, 8)
    _, gray_logs = vae_loss(cfg, gray, gray + 0.3, posterior(0.0, 0.0), step=0)
    assert "chroma_loss" not in gray_logs


def test_chroma_term_squares_block_means():
    """A red/green checkerboard error has no colour on average over 2x2 blocks: the block term ignores it (that
    detail is L1's), a solid red error of the same size per pixel counts fully at every block size."""
    from ldm.losses import chroma_loss

    x = torch.zeros(1, 3, 8, 8)
    sign = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2 * 2 - 1  # +-1 checkerboard
    checker = x + 0.3 * sign * torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1)
    solid = x + 0.3 * torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1)
    per_pixel = chroma_loss(x, checker, block=1).item()
    assert per_pixel == pytest.approx(0.09 * 2 / 2, rel=1e-5)  # |(0.3, -0.3, 0)|^2 = 0.18 on the red-green axis
    assert chroma_loss(x, checker, block=2).item() < 1e-12
    assert chroma_loss(x, solid, block=2).item() == pytest.approx(per_pixel, rel=1e-5)
    assert chroma_loss(x, solid, block=3).item() == pytest.approx(per_pixel, rel=1e-5)  # 8 px: ragged edge blocks
    # vae_loss: cfg.chroma_block wins over the trainer's default (the downsampling factor).
    cfg = VAELossConfig(kl_weight=0.0, chroma_block=1)
    _, logs = vae_loss(cfg, x, checker, posterior(0.0, 0.0), step=0, chroma_block=4)
    assert logs["chroma_loss"].item() == pytest.approx(per_pixel, rel=1e-5)
    _, logs = vae_loss(VAELossConfig(kl_weight=0.0), x, checker, posterior(0.0, 0.0), step=0, chroma_block=4)
    assert logs["chroma_loss"].item() < 1e-12
