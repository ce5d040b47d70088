"""The metric functions on toy feature arrays and images: known values, limits and monotonic behaviour."""

import math

import pytest
import torch
from torch import nn

from ldm.eval import metrics as M


def gaussian(n: int, d: int = 8, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_fid_of_a_set_with_itself_is_zero():
    x = gaussian(500)
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_grows_with_added_noise():
    x = gaussian(1000)
    fids = [M.frechet_distance(x, x + sigma * gaussian(1000, seed=1)) for sigma in (0.1, 0.5, 1.0, 2.0)]
    assert fids == sorted(fids) and fids[0] < 0.2 < fids[-1]


def test_fid_matches_closed_form_for_gaussians():
    # N(0, I) vs N(m, s² I) in d dims: |m|² + d (1 + s² - 2 s).
    d, m, s = 4, 0.5, 2.0
    mu1, mu2 = torch.zeros(d), torch.full((d,), m)
    value = M.frechet_distance_from_statistics(mu1, torch.eye(d), mu2, s**2 * torch.eye(d))
    assert value == pytest.approx(d * m**2 + d * (1 + s**2 - 2 * s))


def test_fid_agrees_with_torchmetrics_custom_feature_network():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Flatten(nn.Module):  # the feature network: flattened pixels
        num_features = 12

        def forward(self, images):
            return images.flatten(1)

    real = torch.rand(200, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    fake = (real + 0.3 * torch.rand(200, 3, 2, 2, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    fid = FrechetInceptionDistance(feature=Flatten())
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert M.frechet_distance(real.flatten(1), fake.flatten(1)) == pytest.approx(fid.compute().item(), rel=1e-4)


def test_kid_is_near_zero_for_one_distribution_and_larger_when_shifted():
    same, _ = M.kernel_distance(gaussian(400, seed=0), gaussian(400, seed=1), num_subsets=20, subset_size=200)
    shifted, _ = M.kernel_distance(gaussian(400, seed=0), gaussian(400, seed=1, shift=0.5), num_subsets=20,
                                   subset_size=200)
    assert shifted > 0.05
    assert abs(same) < 0.05 * shifted


def test_kid_unbiased_estimate_can_be_negative_but_averages_to_zero():
    values = [M.mmd2_unbiased(gaussian(50, seed=2 * i), gaussian(50, seed=2 * i + 1)) for i in range(30)]
    assert min(values) < 0 < max(values)
    assert abs(sum(values) / len(values)) < 0.02


def test_precision_recall_identical_and_disjoint_sets():
    x = gaussian(300)
    assert M.precision_recall(x, x) == (1.0, 1.0)
    assert M.precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_detect_mode_dropping():
    real = torch.cat([gaussian(200, seed=0), gaussian(200, seed=1, shift=20.0)])
    half = gaussian(200, seed=2)  # a generator that only draws the first mode
    precision, recall = M.precision_recall(real, half)
    assert precision > 0.8 and recall < 0.55  # about half of the real set lies in the missed mode


def test_inception_score_limits():
    confident = torch.eye(10).repeat(20, 1) * 50  # every class, each predicted with certainty
    assert M.inception_score(confident, splits=2)[0] == pytest.approx(10.0, rel=1e-3)
    one_class = torch.zeros(200, 10)
    one_class[:, 3] = 50
    assert M.inception_score(one_class)[0] == pytest.approx(1.0, rel=1e-3)


def test_class_distribution_uniform_and_collapsed():
    uniform = M.class_distribution(torch.eye(4).repeat(5, 1))
    assert uniform["class_fractions"] == [0.25] * 4
    assert uniform["class_kl_to_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert uniform["class_entropy"] == pytest.approx(math.log(4))
    collapsed = M.class_distribution(torch.tensor([[1.0, 0, 0, 0]] * 5))
    assert collapsed["class_kl_to_uniform"] == pytest.approx(math.log(4))


def test_class_shares_are_compared_with_the_real_images_predictions():
    """A classifier that puts 1/2 of the real images in class 0: samples with the same shares match the real data
    (KL 0) although they are far from uniform; a class the samples lack costs what its real share says."""
    real = torch.eye(3)[[0, 0, 1, 2]]
    same = M.class_distribution(torch.eye(3)[[0, 0, 0, 0, 1, 1, 2, 2]], real)
    assert same["real_class_fractions"] == [0.5, 0.25, 0.25]
    assert same["class_kl_to_real"] == pytest.approx(0.0, abs=1e-12) and same["class_kl_to_uniform"] > 0.05
    missing = M.class_distribution(torch.eye(3)[[0, 0, 1, 1]], real)  # class 2 missing
    assert missing["class_kl_to_real"] == pytest.approx(0.5 * math.log(0.5 / 0.5) + 0.5 * math.log(0.5 / 0.25))
    assert "class_kl_to_real" not in M.class_distribution(real)


def test_psnr_and_ssim_of_identical_and_noisy_images():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert (M.psnr(images, images) == 100.0).all()  # the cap for identical images
    assert M.ssim(images, images) == pytest.approx(torch.ones(4, dtype=torch.float64))
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    psnrs = [M.psnr((images + s * noise).clamp(-1, 1), images).mean().item() for s in (0.05, 0.2)]
    ssims = [M.ssim((images + s * noise).clamp(-1, 1), images).mean().item() for s in (0.05, 0.2)]
    assert psnrs[0] > psnrs[1] and ssims[0] > ssims[1] and ssims[0] < 1
    # PSNR on the [0, 1] scale: an error of 0.1 in [-1, 1] is 0.05 there, -20 log10(0.05) = 26.02 dB.
    assert M.psnr(images * 0 + 0.1, images * 0).mean().item() == pytest.approx(26.0206, abs=1e-3)


def test_ssim_works_on_8x8_images():
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert M.ssim(images, images) == pytest.approx(torch.ones(2, dtype=torch.float64))
