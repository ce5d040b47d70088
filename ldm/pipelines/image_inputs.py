"""Image, mask and strength arguments of the editing pipelines: converted with diffusers' `VaeImageProcessor` and
checked before any work, so that a bad argument fails with a ValueError that names it.

Conventions (diffusers' own): PIL images, or arrays / tensors with values in [0, 1] (NHWC arrays, NCHW tensors);
values outside [0, 1] (a [-1, 1] tensor, 0..255 pixels) are refused, not silently misread (diffusers' own processor
only warns about [-1, 1] tensors, and only where it normalises). Masks follow `StableDiffusionInpaintPipeline`: white
(1) marks the pixels to fill, black (0) the pixels to keep; values are binarised at 0.5.

This file imports only torch, diffusers, numpy and PIL: it is copied into every saved model folder.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | list


def _as_batch(image: ImageInput, name: str) -> ImageInput:
    if image is None:
        raise ValueError(f"{name}: required; pass a PIL image, a list of them, an array or a tensor")
    if isinstance(image, list) and not image:
        raise ValueError(f"{name}: an empty list; pass at least one image")
    if not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor, list)):
        # ValueError like every other bad argument of the pipelines, so callers catch one kind of error.
        raise ValueError(f"{name}: expected a PIL image, a list of them, a numpy array or a torch tensor, "  # noqa: TRY004
                         f"got {type(image).__name__}")
    return image


def preprocess_image(image: ImageInput, name: str, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, channels, H, W) in [0, 1] (the VAE takes ``2 x - 1``), or a ValueError naming `name` if the image does not
    have `channels` channels and (H, W) == `size`. Images are never resized silently: a model takes the size it was
    trained at."""
    processor = VaeImageProcessor(do_resize=False, do_normalize=False)
    try:
        pixels = processor.preprocess(_as_batch(image, name))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: {e}") from e
    if pixels.ndim != 4:
        raise ValueError(f"{name}: expected a batch of images (B, C, H, W), got shape {tuple(pixels.shape)}")
    check_range(pixels, name)
    got_channels, height, width = pixels.shape[1:]
    if got_channels != channels:
        hint = " (convert PIL images with .convert('L'))" if channels == 1 else " (convert PIL images with .convert('RGB'))"
        raise ValueError(f"{name}: {got_channels}-channel image(s), but this model takes {channels} channel(s){hint}")
    if (height, width) != tuple(size):
        raise ValueError(f"{name}: {width}x{height} image(s), but this model takes {size[1]}x{size[0]}; resize "
                         "the image first")
    return pixels


def check_range(pixels: torch.Tensor, name: str) -> None:
    """A ValueError naming `name` unless every value is finite and in [0, 1] (PIL images always are)."""
    if not torch.isfinite(pixels).all():
        raise ValueError(f"{name}: has NaN or infinite values; expected values in [0, 1]")
    low, high = pixels.min().item(), pixels.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"{name}: values in [{low:.4g}, {high:.4g}], expected [0, 1] as in diffusers' pipelines; "
                         "convert a [-1, 1] tensor x with x / 2 + 0.5 and 0..255 pixels with x / 255")


def preprocess_mask(mask_image: ImageInput, batch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) binary masks (1: fill, 0: keep), one per image or one for all; checked like the image and
    refused when empty (nothing to fill) or all ones (nothing known: that is sampling from noise)."""
    processor = VaeImageProcessor(do_resize=False, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    mask_image = _as_batch(mask_image, "mask_image")
    if isinstance(mask_image, torch.Tensor) and mask_image.ndim in (2, 3):
        mask_image = mask_image.reshape(1, 1, *mask_image.shape[-2:]) if mask_image.ndim == 2 or \
            mask_image.shape[0] == 1 else mask_image[:, None]
    try:
        mask = processor.preprocess(mask_image)
    except (ValueError, TypeError) as e:
        raise ValueError(f"mask_image: {e}") from e
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask_image: expected one-channel masks (B, 1, H, W), got shape {tuple(mask.shape)}")
    if tuple(mask.shape[2:]) != tuple(size):
        raise ValueError(f"mask_image: {mask.shape[3]}x{mask.shape[2]} mask(s), but the image is {size[1]}x{size[0]}; "
                         "masks are given at image resolution")
    if mask.shape[0] not in (1, batch_size):
        raise ValueError(f"mask_image: {mask.shape[0]} masks for {batch_size} images; give one per image or one for all")
    mask = (mask > 0.5).float().expand(batch_size, -1, -1, -1)
    filled = mask.flatten(1).mean(1)
    if (filled == 0).any():
        raise ValueError("mask_image: a mask is empty (all black): there is nothing to fill; white marks the pixels "
                         "to inpaint")
    if (filled == 1).any():
        raise ValueError("mask_image: a mask is all white: every pixel would be filled and nothing of the image kept, "
                         "which is sampling from noise; use LatentDiffusionPipeline (`ldm sample`) for that")
    return mask


def mask_to_latent_grid(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The rule from image masks to latent masks: a latent cell is filled if ANY pixel of the image patch it covers
    is masked (max-pooling), so that no masked pixel is left to the known latents, whose decoder receptive field
    would otherwise carry the old content into the hole."""
    return F.adaptive_max_pool2d(mask, latent_size)


def check_strength(strength: float) -> float:
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength: must be a number in [0, 1] (0 keeps the image, 1 ignores it), got {strength!r}")
    return float(strength)
