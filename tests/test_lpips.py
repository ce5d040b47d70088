"""LPIPS on a seeded random VGG16 trunk: metric properties, gradients, weights file layout and errors."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.lpips import CHANNELS, LPIPS, LPIPSWeightsError, convert_lpips_weights, main

CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision vgg16().features conv layers


def fake_vgg16_state_dict(seed=0):
    """torchvision-shaped VGG16 state dict (He-scaled random convs, plus a classifier tensor that must be dropped)."""
    g = torch.Generator().manual_seed(seed)
    ref = LPIPS().net.features
    sd = {}
    for i in CONV_INDICES:
        w = ref[i].weight
        fan_in = w[0].numel()
        sd[f"features.{i}.weight"] = torch.randn(w.shape, generator=g) * (2.0 / fan_in) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(w.shape[0], generator=g) * 0.01
    sd["classifier.0.weight"] = torch.zeros(4, 4)
    return sd


def fake_lin_state_dict(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(CHANNELS)}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return convert_lpips_weights(
        fake_vgg16_state_dict(), fake_lin_state_dict(), tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    )


@pytest.fixture(scope="module")
def lpips(weights_file):
    return LPIPS.from_file(weights_file)


def images(n, channels=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Smooth images (upsampled low-res noise) so added noise is a real distortion, not more of the same.
    low = torch.rand(n, channels, size // 4, size // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


def test_identical_images_have_zero_distance(lpips):
    x = images(2)
    d = lpips(x, x.clone())
    assert d.shape == (2,)
    assert d.abs().max() < 1e-6


def test_distance_is_positive_and_symmetric(lpips):
    x, y = images(3, seed=0), images(3, seed=1)
    d_xy, d_yx = lpips(x, y), lpips(y, x)
    assert d_xy.shape == (3,)
    assert (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx)


def test_more_distortion_means_larger_distance(lpips):
    x = images(4, seed=2)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    d = [lpips(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.5)]
    assert 0 < d[0] < d[1] < d[2], d


def test_gradient_reaches_input_not_parameters(lpips):
    x = images(2, seed=4).requires_grad_(True)
    y = images(2, seed=5)
    lpips(x, y).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips.parameters())
    assert not lpips.training


def test_gradient_is_finite_where_features_are_all_zero(weights_file, tmp_path):
    # A very negative last bias makes relu5_3 all zeros: the channel norm is 0 there; no NaN may reach the input.
    state = load_file(str(weights_file))
    state["net.features.28.bias"] = torch.full_like(state["net.features.28.bias"], -1e4)
    save_file(state, str(tmp_path / "dead.safetensors"))
    x = images(1, seed=6).requires_grad_(True)
    LPIPS.from_file(tmp_path / "dead.safetensors")(x, images(1, seed=7)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_single_channel_inputs_match_repeated_rgb(lpips):
    x, y = images(2, channels=1, seed=8), images(2, channels=1, seed=9)
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, lpips(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))


def test_key_layout_follows_torchvision_and_lpips(weights_file):
    keys = set(load_file(str(weights_file)))
    expected = {f"net.features.{i}.{p}" for i in CONV_INDICES for p in ("weight", "bias")}
    expected |= {f"lin{i}.model.1.weight" for i in range(5)}
    assert keys == expected == set(LPIPS().state_dict())
    trunk = LPIPS().net.features
    assert [i for i, m in enumerate(trunk) if isinstance(m, torch.nn.Conv2d)] == list(CONV_INDICES)


def test_missing_file_raises_with_instructions(tmp_path):
    with pytest.raises(LPIPSWeightsError, match="not found") as err:
        LPIPS.from_file(tmp_path / "nope.safetensors")
    assert "python -m ldm.lpips convert" in str(err.value)


def test_missing_and_unexpected_keys_are_named(weights_file, tmp_path):
    state = load_file(str(weights_file))
    del state["lin3.model.1.weight"]
    state["extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LPIPSWeightsError) as err:
        LPIPS.from_file(tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "lin3.model.1.weight" in msg and "extra" in msg and "python -m ldm.lpips convert" in msg


def test_pickle_file_is_rejected(tmp_path):
    torch.save(fake_lin_state_dict(), tmp_path / "vgg.pth")
    with pytest.raises(LPIPSWeightsError, match="safetensors"):
        LPIPS.from_file(tmp_path / "vgg.pth")


def test_convert_rejects_wrong_shapes(tmp_path):
    lin = fake_lin_state_dict()
    lin["lin0.model.1.weight"] = torch.rand(1, 3, 1, 1)
    with pytest.raises(LPIPSWeightsError, match="wrong shapes"):
        convert_lpips_weights(fake_vgg16_state_dict(), lin, tmp_path / "x.safetensors")


def test_convert_cli_round_trip(weights_file, tmp_path):
    torch.save(fake_vgg16_state_dict(), tmp_path / "vgg16.pth")
    torch.save(fake_lin_state_dict(), tmp_path / "vgg.pth")
    out = tmp_path / "cli.safetensors"
    main(["convert", "--vgg", str(tmp_path / "vgg16.pth"), "--lin", str(tmp_path / "vgg.pth"), "--out", str(out)])
    a, b = load_file(str(out)), load_file(str(weights_file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
