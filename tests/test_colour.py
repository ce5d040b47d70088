"""Colour fidelity scores (ldm.eval.colour): CIELAB values, gray reconstructions and gray samples score as gray."""

import pytest
import torch

from ldm.eval.colour import chroma, image_colour, reconstruction_colour, rgb_to_lab, sample_colour


def _pixel(r: float, g: float, b: float) -> torch.Tensor:
    """One sRGB pixel given in [0, 1], as a (1, 3, 1, 1) image in [-1, 1]."""
    return torch.tensor([r, g, b]).view(1, 3, 1, 1) * 2 - 1


@pytest.mark.parametrize("rgb, lab", [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),     # reference values of sRGB primaries (D65)
    ((0.0, 1.0, 0.0), (87.73, -86.18, 83.18)),
    ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),
])
def test_rgb_to_lab_matches_reference_values(rgb, lab):
    out = rgb_to_lab(_pixel(*rgb)).flatten()
    assert torch.allclose(out, torch.tensor(lab, dtype=torch.float64), atol=0.05)


def _coloured_objects(n: int = 4, size: int = 16) -> torch.Tensor:
    """Saturated squares of different hues on white, in [-1, 1]."""
    images = torch.ones(n, 3, size, size)
    hues = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.7, 0.2], [0.2, 0.3, 1.0], [0.9, 0.8, 0.0]])
    for i in range(n):
        images[i, :, 4:12, 4:12] = hues[i % 4].view(3, 1, 1) * 2 - 1
    return images


def _gray(images: torch.Tensor) -> torch.Tensor:
    """The same images with every pixel replaced by its luma (the reconstruction issue 17's models made)."""
    luma = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)
    return luma.expand(-1, 3, -1, -1).clone()


def test_a_perfect_reconstruction_keeps_all_chroma_and_a_gray_one_none():
    x = _coloured_objects()
    perfect = reconstruction_colour(x, x)
    assert perfect["chroma_kept"] == pytest.approx(1.0) and perfect["chroma_error"] == pytest.approx(0.0, abs=1e-9)
    assert perfect["num_coloured_pixels"] == 4 * 64  # the white background does not count
    gray = reconstruction_colour(x, _gray(x))
    assert gray["chroma_kept"] < 0.01
    # Gray loses all of each pixel's chroma: the error is the inputs' mean chroma.
    assert gray["chroma_error"] == pytest.approx(chroma(rgb_to_lab(x))[:, 4:12, 4:12].mean().item(), rel=0.02)
    # A hue error with the strength kept: chroma kept near 1, the error still large.
    swapped = reconstruction_colour(x, x[:, [2, 1, 0]])
    assert swapped["chroma_kept"] > 0.6 and swapped["chroma_error"] > 50


def test_grayscale_data_has_no_colour_score():
    assert reconstruction_colour(_gray(_coloured_objects()), _gray(_coloured_objects())) == {}


def test_sample_colour_shows_a_gray_model():
    real = image_colour(_coloured_objects())
    assert real.shape == (4, 2) and (real[:, 1] == 0.25).all()  # a quarter of each image is coloured
    gray = sample_colour(real, image_colour(_gray(_coloured_objects())))
    assert gray["chroma_ratio"] < 0.01 and gray["coloured_share"] == 0.0
    same = sample_colour(real, image_colour(_coloured_objects()))
    assert same["chroma_ratio"] == pytest.approx(1.0) and same["real_coloured_share"] == pytest.approx(0.25)


class _MeanFeatures(torch.nn.Module):
    """A stand-in feature network: per-channel means as features (enough for the colour path of extract)."""

    metric_prefix, kind = "toy-", "toy"

    def features_and_logits(self, images):
        f = images.mean(dim=(2, 3))
        return f, f


def test_sample_metrics_report_colour_of_rgb_samples_against_real_images():
    from ldm.eval.evaluation import sample_metrics
    from ldm.eval.features import extract

    network = _MeanFeatures()
    colourful = _coloured_objects(8)
    real = extract(network, colourful.split(4))
    assert real["colour"].shape == (8, 2)
    gray = sample_metrics(network, real, extract(network, _gray(colourful).split(4)), names=("fid",))
    assert gray["chroma_ratio"] < 0.01 and gray["real_mean_chroma"] > 10
    same = sample_metrics(network, real, extract(network, colourful.split(4)), names=("fid",))
    assert same["chroma_ratio"] == pytest.approx(1.0)
    # Grayscale models: no colour keys at all.
    one_channel = extract(network, _gray(colourful)[:, :1].split(4))
    assert "colour" not in one_channel and "chroma_ratio" not in sample_metrics(network, one_channel, one_channel,
                                                                                 names=("fid",))
