"""The image front door for Qwen2-VL / Qwen2.5-VL: any image -> uint8 [3, H, W] at Qwen's size -> patches.

    img = engine.image.load_image("cat.jpg")                    # uint8 [3, H, W], H and W multiples of 28
    pixel_values, grid_thw = engine.image.patchify_images([img, other])        # = Qwen2VLImageProcessor(...)
    embeds, grid_thw = engine.image.embed_images([img, other], visual.patch_embed.proj.weight)  # fused

Resizing follows transformers' `Qwen2VLImageProcessor` exactly (`smart_resize`, PIL bicubic on
RGB uint8), so `patchify_images(images)` equals the processor's `pixel_values`; `embed_images` goes
straight from uint8 pixels to patch embeddings, so a training pipeline never builds the host-side
fp32 [N, 1176] tensor. Images are kept as uint8 (1/4 of fp32, 1/8 of fp32 with the Tp repeat) until
the kernel reads them, on whichever device they were moved to.
"""
from __future__ import annotations

import io
import math
import os

import numpy as np
import torch

from engine.patch_geometry import PatchGeometry, geometry_keywords

__all__ = [
    "MIN_PIXELS",
    "MAX_PIXELS",
    "smart_resize",
    "to_pil",
    "load_image",
    "load_images",
    "patchify_images",
    "embed_images",
    "num_image_tokens",
]

# The processor's defaults (Qwen2VLImageProcessor.size: shortest_edge, longest_edge).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) -> (h, w): multiples of `factor`, h*w within [min_pixels, max_pixels], aspect ratio kept.

    Same arithmetic as transformers' `smart_resize` (Python's round-half-even, floor when shrinking,
    ceil when growing), so sizes, and hence patch counts, match the processor's.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_pil(image):
    """A PIL image, a path, encoded bytes, a uint8 array / tensor ([H, W, 3], [3, H, W], [H, W]) -> RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as im:
            return im.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 (0..255), got {image.dtype}; float images go to patchify directly")
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)  # [C, H, W] -> [H, W, C]
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(f"image must be [H, W], [H, W, 3|4] or [3|4, H, W], got shape {image.shape}")
        return Image.fromarray(image).convert("RGB")
    raise ValueError(f"image must be a PIL image, a path, bytes, or a uint8 array/tensor, got {type(image).__name__}")


def load_image(
    image,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    resize: bool = True,
) -> torch.Tensor:
    """Any image (see `to_pil`) -> uint8 [3, H, W], resized like the processor (PIL bicubic to `smart_resize`).

    With `resize=False` the size must already be a multiple of patch_size*merge_size.
    """
    from PIL import Image

    pil = to_pil(image)
    w, h = pil.size
    if resize:
        nh, nw = smart_resize(h, w, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels)
        if (nh, nw) != (h, w):
            pil = pil.resize((nw, nh), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_images(images, **kw) -> list[torch.Tensor]:
    """A list of images -> a list of uint8 [3, H_i, W_i] (each resized on its own)."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    return [load_image(im, **kw) for im in images]


@geometry_keywords
def patchify_images(
    images, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, device=None, geometry: PatchGeometry
):
    """Images (anything `load_image` takes, or uint8 tensors already sized) -> (pixel_values [N, C*Tp*P*P] fp32,
    grid_thw [B, 3] int64): what Qwen2VLImageProcessor returns, by `engine.ops.patchify`.
    The six patch settings are `engine.patch_geometry.PatchGeometry`'s keywords (checked before any image is loaded)."""
    import engine.ops

    imgs = _prepared(images, min_pixels, max_pixels, geometry, device)
    return engine.ops.patchify(imgs, **geometry.keywords())


@geometry_keywords
def embed_images(
    images, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, geometry: PatchGeometry,
):
    """Images -> (patch embeddings [N, D] in weight's dtype, grid_thw [B, 3]) by the fused
    `engine.ops.patchify_embed`; uint8 pixels go to weight's device, never to fp32 on the host.
    The six patch settings are as in `patchify_images`."""
    import engine.ops

    imgs = _prepared(images, min_pixels, max_pixels, geometry, weight.device)
    return engine.ops.patchify_embed(imgs, weight, bias, **geometry.keywords())


def num_image_tokens(grid_thw: torch.Tensor, *, merge_size: int = 2) -> list[int]:
    """grid_thw [B, 3] -> the number of image placeholder tokens of each image (t*h*w / merge_size^2)."""
    return [int(t * h * w) // (merge_size * merge_size) for t, h, w in grid_thw.tolist()]


def _prepared(images, min_pixels, max_pixels, geometry: PatchGeometry, device) -> list[torch.Tensor]:
    """Tensors [3, H, W] / [B, 3, H, W] already at their `smart_resize` size pass through (any dtype, as
    patchify takes them); everything else is loaded and resized."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    patch_size, merge_size, factor = geometry.patch_size, geometry.merge_size, geometry.block
    out = []
    for im in images:
        sized = (
            isinstance(im, torch.Tensor)
            and im.dim() in (3, 4)
            and im.shape[-3] == 3
            and smart_resize(im.shape[-2], im.shape[-1], factor=factor, min_pixels=min_pixels, max_pixels=max_pixels) == tuple(im.shape[-2:])
        )
        t = im if sized else load_image(im, min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size, merge_size=merge_size)
        out.append(t.to(device) if device is not None else t)
    return out
