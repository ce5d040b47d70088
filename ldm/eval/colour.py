"""Colour fidelity in CIELAB, where a gray image scores as gray whatever its PSNR.

PSNR and SSIM are dominated by luminance and, on objects on a plain background, by the background: a reconstruction
that keeps every edge and turns every object gray scores well on both. CIELAB separates lightness L* from the two
opponent colour axes a* (green-red) and b* (blue-yellow); the chroma C* = sqrt(a*² + b*²) is 0 for any gray and
about 30-130 for saturated colours, and a distance of about 2.3 in the a*b* plane is a just-noticeable difference.

  rgb_to_lab            sRGB images in [-1, 1] -> (L*, a*, b*), D65 white
  reconstruction_colour  chroma kept and chroma error of reconstructions on the input's coloured pixels
  image_colour / sample_colour  mean chroma and coloured-pixel share per image, and of samples against real images

Pixels count as coloured when the reference's C* exceeds COLOURED_CHROMA, so the white background and gray
regions (whose chroma a reconstruction cannot lose) do not dilute the score.
"""

from __future__ import annotations

import torch

COLOURED_CHROMA = 10.0  # C* above which a pixel counts as coloured (gray-ish JPEG noise stays under ~5)
_RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) sRGB in [-1, 1] -> (N, 3, H, W) CIELAB (L* in [0, 100]), in float64."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"rgb_to_lab needs (N, 3, H, W) RGB images, got shape {tuple(images.shape)}")
    srgb = ((images.double() + 1) / 2).clamp(0, 1)
    # 1. Undo the sRGB transfer curve.
    linear = torch.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    # 2. Linear RGB -> XYZ, relative to the D65 white.
    xyz = torch.einsum("ij,njhw->nihw", _RGB_TO_XYZ, linear) / _WHITE_D65.view(1, 3, 1, 1)
    # 3. XYZ -> L*a*b*: cube root with the linear segment near black.
    eps = (6 / 29) ** 3
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def chroma(lab: torch.Tensor) -> torch.Tensor:
    """C* = sqrt(a*² + b*²) per pixel: (N, H, W)."""
    return torch.sqrt(lab[:, 1] ** 2 + lab[:, 2] ** 2)


class ColourAccumulator:
    """Sums, batch by batch, what `reconstruction_colour` reports, so evaluation need not keep every image."""

    def __init__(self):
        self.kept = self.reference = self.error = 0.0
        self.pixels = 0

    def add(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> None:
        lab_in, lab_rec = rgb_to_lab(inputs), rgb_to_lab(reconstructions)
        c_in = chroma(lab_in)
        mask = c_in > COLOURED_CHROMA
        self.reference += c_in[mask].sum().item()
        self.kept += chroma(lab_rec)[mask].sum().item()
        self.error += torch.sqrt(((lab_in[:, 1:] - lab_rec[:, 1:]) ** 2).sum(dim=1))[mask].sum().item()
        self.pixels += int(mask.sum())

    def result(self) -> dict[str, float]:
        if not self.pixels:
            return {}  # no coloured pixel in the references: nothing to lose
        return {"chroma_kept": self.kept / self.reference, "chroma_error": self.error / self.pixels,
                "num_coloured_pixels": self.pixels}


def reconstruction_colour(inputs: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, float]:
    """On the input's coloured pixels (C* > COLOURED_CHROMA):

    chroma_kept   sum C*(reconstruction) / sum C*(input): 1 keeps the colour's strength, 0 is gray
    chroma_error  mean a*b* distance sqrt(da*² + db*²): hue and strength together (gray scores about mean C*(input))

    Empty when the inputs have no coloured pixel (grayscale data)."""
    acc = ColourAccumulator()
    acc.add(inputs, reconstructions)
    return acc.result()


def image_colour(images: torch.Tensor) -> torch.Tensor:
    """(N, 2) per image of an (N, 3, H, W) batch in [-1, 1]: mean C* over its pixels, share of coloured pixels.
    Per image, so that the statistics of a set can be gathered across processes and cached with its features."""
    c = chroma(rgb_to_lab(images))
    return torch.stack([c.mean(dim=(1, 2)), (c > COLOURED_CHROMA).double().mean(dim=(1, 2))], dim=1)


def sample_colour(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """The samples' colour statistics beside the real images' (`image_colour` rows of each set), and the ratio of
    mean chromas: 1 is as colourful as the data, near 0 a gray model, whatever its FID."""
    r, f = real.double().mean(dim=0), fake.double().mean(dim=0)
    return {"mean_chroma": f[0].item(), "real_mean_chroma": r[0].item(),
            "chroma_ratio": f[0].item() / max(r[0].item(), 1e-8),
            "coloured_share": f[1].item(), "real_coloured_share": r[1].item()}
