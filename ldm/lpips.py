"""LPIPS perceptual distance (Zhang et al. 2018, "vgg" variant v0.1), the perceptual term of the LDM autoencoder loss.

    d(x, y) = sum_l  mean_hw  w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2

where f_l are VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, |.| is the norm over channels
and w_l >= 0 the learned per-channel weights (1x1 convs `lin0..lin4`). Plain torch: torchvision is not needed.

Weights come only from one safetensors file whose keys are exactly `LPIPS().state_dict()`:

    net.features.N.weight / .bias   VGG16 trunk, N in 0,2,5,7,10,12,14,17,19,21,24,26,28
                                    (torchvision's `vgg16().features` indices, with `net.` in front)
    linL.model.1.weight             L in 0..4, shape [1, C_L, 1, 1] (as in the lpips package's weights/v0.1/vgg.pth)

Make it once, on a machine with internet, torchvision and lpips (`pip install torchvision lpips`):

    python -c "import torch, torchvision; torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), 'vgg16.pth')"
    python -c "import lpips, os; print(os.path.join(os.path.dirname(lpips.__file__), 'weights/v0.1/vgg.pth'))"
    python -m ldm.lpips convert --vgg vgg16.pth --lin <path printed above> --out lpips_vgg.safetensors

Usage: `lpips = LPIPS.from_file("lpips_vgg.safetensors"); d = lpips(x, y)` with x, y in [-1, 1], d of shape [N].
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

# torchvision's vgg16().features, by index: conv channel counts ("M" = 2x2 max-pool). Each conv is followed by a ReLU.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
SLICE_ENDS = (4, 9, 16, 23, 30)  # features[0:4] -> relu1_2, [4:9] -> relu2_2, ... [23:30] -> relu5_3 (as lpips)
CHANNELS = (64, 128, 256, 512, 512)  # channels of the five tapped layers
SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer: maps [-1, 1] images to ImageNet-normalised inputs
SCALE = (0.458, 0.448, 0.450)

HOW_TO_MAKE = (
    "The file must be a safetensors file holding the VGG16 trunk (net.features.N.weight/bias, N in "
    "0,2,5,7,10,12,14,17,19,21,24,26,28) and the five LPIPS heads (linL.model.1.weight, L in 0..4). Make it on a "
    "machine with torchvision and lpips: save torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict() to "
    "vgg16.pth, then run `python -m ldm.lpips convert --vgg vgg16.pth --lin <lpips package>/weights/v0.1/vgg.pth "
    "--out lpips_vgg.safetensors` (see the docstring of ldm/lpips.py)."
)


class LPIPSWeightsError(ValueError):
    """An LPIPS weights file that is missing or does not hold exactly the expected tensors."""


class VGG16Features(nn.Module):
    """The conv part of VGG16 up to relu5_3, laid out as torchvision's `vgg16().features` so its keys load as-is."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)  # 30 layers: indices 0..29, the final pool (30) is never used

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, start = [], 0
        for end in SLICE_ENDS:
            x = self.features[start:end](x)
            feats.append(x)
            start = end
        return feats


class LinearHead(nn.Module):
    """Per-channel weights of one layer as a bias-free 1x1 conv; `model.1` keeps the lpips package's key names.

    Index 0 is a Dropout in lpips; here it is the identity, so the distance stays deterministic when a parent
    module is put in train mode."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS-vgg distance between images in [-1, 1]; `forward(x, y)` returns one distance per sample, shape [N]."""

    def __init__(self):
        super().__init__()
        self.net = VGG16Features()
        for i, c in enumerate(CHANNELS):
            self.add_module(f"lin{i}", LinearHead(c))
        # Constants, not weights: non-persistent so they are not part of the file's key layout.
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        """Load weights from a safetensors file (layout in the module docstring); eval mode, parameters frozen."""
        path = Path(path)
        if not path.is_file():
            raise LPIPSWeightsError(f"LPIPS weights file not found: {path}. {HOW_TO_MAKE}")
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise LPIPSWeightsError(f"{path} is not a readable safetensors file ({e}). {HOW_TO_MAKE}") from e
        model = cls()
        _check_state_dict(state, model.state_dict(), path)
        model.load_state_dict(state)
        return model.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # 1. Grey images become RGB; both go through the trunk in one batch after the lpips input scaling.
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if y.shape[1] == 1:
            y = y.repeat(1, 3, 1, 1)
        feats = self.net((torch.cat([x, y]) - self.shift) / self.scale)
        dist = 0.0
        for i, f in enumerate(feats):
            # 2. Unit-normalise channels at each position (eps as in lpips). vector_norm's gradient is finite where
            #    all channels are 0; sqrt(sum f^2) gives NaN there, which only ReLU's backward mask happens to hide.
            f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + 1e-10)
            fx, fy = f.chunk(2)
            # 3. Weighted squared difference (1x1 conv), averaged over space, summed over layers.
            dist = dist + getattr(self, f"lin{i}")((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return dist


def _check_state_dict(state: dict, expected: dict, source) -> None:
    """Raise LPIPSWeightsError naming missing, unexpected or wrongly shaped tensors."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{name} {items[:5]}{' ...' if len(items) > 5 else ''}"
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes))
        if items
    ]
    if problems:
        raise LPIPSWeightsError(f"LPIPS weights from {source} do not fit: {'; '.join(problems)}. {HOW_TO_MAKE}")


def convert_lpips_weights(vgg16_state_dict: dict, lpips_lin_state_dict: dict, out_path: str | Path) -> Path:
    """Write the LPIPS safetensors file from torchvision's VGG16 state dict (`features.N.*`; `classifier.*` is
    dropped) and the lpips package's head state dict (`linL.model.1.weight`, weights/v0.1/vgg.pth)."""
    state = {f"net.{k}": v for k, v in vgg16_state_dict.items() if k.startswith("features.")}
    state.update({k: v for k, v in lpips_lin_state_dict.items() if k.startswith("lin")})
    _check_state_dict(state, LPIPS().state_dict(), "the given state dicts")
    # Owned, contiguous float32 copies: safetensors refuses shared or strided storage.
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_path), metadata={"format": "pt", "model": "lpips-vgg-v0.1"})
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ldm.lpips", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="torchvision VGG16 + lpips heads (.pth) -> one safetensors file")
    conv.add_argument("--vgg", required=True, help="torch.save'd torchvision vgg16(weights='IMAGENET1K_V1') state dict")
    conv.add_argument("--lin", required=True, help="the lpips package's weights/v0.1/vgg.pth")
    conv.add_argument("--out", required=True, help="safetensors file to write, e.g. lpips_vgg.safetensors")
    args = parser.parse_args(argv)
    # weights_only=True: the user chose these two files; even so, nothing but tensors is unpickled.
    vgg = torch.load(args.vgg, map_location="cpu", weights_only=True)
    lin = torch.load(args.lin, map_location="cpu", weights_only=True)
    print(f"wrote {convert_lpips_weights(vgg, lin, args.out)}")


if __name__ == "__main__":
    main()
