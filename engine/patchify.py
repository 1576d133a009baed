"""`engine.ops.patchify`: images -> the `pixel_values` Qwen2VLImageProcessor returns.

    pixel_values, grid_thw = engine.ops.patchify(images)   # images already sized to multiples of 28

Contract: docs/ops.md#patchify. The `torch` backend is `engine.reference.patchify`; the fast ones
run the kernel `patchify_fwd` (csrc/cpu/patchify.cpp, csrc/cuda/patchify.cu,
triton_kernels/patchify.py) through `engine.kernels`, inside the custom op `engine::patchify`
(with a fake; no autograd: pixels are data).
"""
from __future__ import annotations

import torch

from engine import dispatch, kernels, reference
from engine.patch_geometry import PatchGeometry, geometry_keywords

__all__ = ["patchify"]


@geometry_keywords
def patchify(images, *, geometry: PatchGeometry):
    """Qwen2VLImageProcessor's `pixel_values` for images already sized to multiples of patch_size*merge_size.

    Args:
        images: `[B, C, H, W]` or `[C, H, W]` uint8 or float tensor, or a list of such tensors of
            different sizes; C = len(mean).
        patch_size, temporal_patch_size, merge_size, mean, std, rescale: see
            `engine.patch_geometry.PatchGeometry`; `x = (pixel * rescale - mean) / std`.

    Returns:
        `(pixel_values [N, C*Tp*P*P] float32, grid_thw [B, 3] int64)`: rows in merge-block order,
        features (channel, frame, row, col) with the frame repeated Tp times. Not differentiable.
    """
    imgs = geometry.image_list(images)
    grid_thw = geometry.grid_thw(imgs)
    backend = dispatch.select_backend("patchify", imgs[0].device.type)
    if backend == "torch":
        return reference.patchify(imgs, geometry=geometry)[0], grid_thw
    g = geometry
    pixel_values = patchify_op(imgs, g.patch_size, g.temporal_patch_size, g.merge_size, list(g.mean), list(g.std), g.rescale, backend)
    return pixel_values, grid_thw


# ---- custom op (not differentiable: pixels are data) ----


@torch.library.custom_op("engine::patchify", mutates_args=())
def patchify_op(
    images: list[torch.Tensor],
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
    mean: list[float],
    std: list[float],
    rescale: float,
    backend: str,
) -> torch.Tensor:
    """images: each [B_i, C, H_i, W_i] -> pixel_values [N, C*Tp*P*P] fp32."""
    return kernels.get("patchify_fwd", backend)(
        images=images, patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size,
        mean=mean, std=std, rescale=rescale,
    )


@patchify_op.register_fake
def _(images, patch_size, temporal_patch_size, merge_size, mean, std, rescale, backend):
    C, P = images[0].shape[1], patch_size
    N = sum(t.shape[0] * (t.shape[2] // P) * (t.shape[3] // P) for t in images)
    return images[0].new_empty((N, C * temporal_patch_size * P * P), dtype=torch.float32)
