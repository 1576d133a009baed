"""`engine.ops.patchify_embed`: raw pixels -> patch embeddings, `patch_embed(patchify(images))` in one kernel.

    embeds, grid_thw = engine.ops.patchify_embed(images, weight, bias)   # pixel_values never exists

Contract: docs/ops.md#patchify_embed. The `torch` backend is `engine.reference.patchify_embed`; the
fast ones run the kernels `patchify_embed_fwd` / `patchify_embed_bwd` (csrc/cpu/patchify_embed.cpp,
csrc/cuda/patchify_embed.cu, triton_kernels/patchify_embed.py) through `engine.kernels`, inside the
custom op `engine::patchify_embed` with a registered fake and autograd (into weight and bias only).
"""
from __future__ import annotations

import torch

from engine import _validate, dispatch, kernels, reference
from engine.patch_embed import check_weight
from engine.patch_geometry import PatchGeometry, geometry_keywords

__all__ = ["patchify_embed"]


@geometry_keywords
def patchify_embed(images, weight: torch.Tensor, bias: torch.Tensor | None = None, *, geometry: PatchGeometry):
    """`patch_embed(patchify(images).to(weight.dtype), weight, bias)` without ever writing pixel_values.

    Args:
        images: as in `patchify`.
        weight: `[D, C, Tp, P, P]` with C = len(mean), Tp = temporal_patch_size, P = patch_size.
        bias: `[D]` or None.
        patch_size, temporal_patch_size, merge_size, mean, std, rescale: as in `patchify`.

    Returns:
        `(embeds [N, D] in weight's dtype, grid_thw [B, 3] int64)`; embeds are differentiable in weight
        and bias. The kernels fold the normalization and the Tp repeat into the weight, so the GEMM
        runs on raw pixels with K = C*P*P (half the Conv3d's).
    """
    check_weight(weight, bias)
    D, C, Tp, P, _ = weight.shape
    Tp_want, P_want = geometry.temporal_patch_size, geometry.patch_size
    if Tp != Tp_want or P != P_want:
        raise ValueError(
            f"weight must be [D, C, temporal_patch_size={Tp_want}, patch_size={P_want}, patch_size], got {tuple(weight.shape)}"
        )
    if C != geometry.channels:
        raise ValueError(f"mean must have one value per channel of weight ({C}), got {geometry.channels}")
    imgs = geometry.image_list(images)
    _validate.check_same_device(weight=weight, images=imgs[0], bias=bias)
    grid_thw = geometry.grid_thw(imgs)
    backend = dispatch.select_backend("patchify_embed", weight.device.type)
    if backend == "torch":
        return reference.patchify_embed(imgs, weight, bias, geometry=geometry)[0], grid_thw
    g = geometry
    embeds = patchify_embed_op(imgs, weight, bias, g.merge_size, list(g.mean), list(g.std), g.rescale, backend)
    return embeds, grid_thw


# ---- custom op: forward, backward, fake, autograd ----


@torch.library.custom_op("engine::patchify_embed", mutates_args=())
def patchify_embed_op(
    images: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    merge_size: int,
    mean: list[float],
    std: list[float],
    rescale: float,
    backend: str,
) -> torch.Tensor:
    """images: each [B_i, C, H_i, W_i], weight [D, C, Tp, P, P], bias [D] -> embeds [N, D] (weight's dtype)."""
    return kernels.get("patchify_embed_fwd", backend)(
        images=images, weight=weight, bias=bias, merge_size=merge_size, mean=mean, std=std, rescale=rescale
    )


@patchify_embed_op.register_fake
def _(images, weight, bias, merge_size, mean, std, rescale, backend):
    P = weight.shape[3]
    N = sum(t.shape[0] * (t.shape[2] // P) * (t.shape[3] // P) for t in images)
    return weight.new_empty((N, weight.shape[0]))


@torch.library.custom_op("engine::patchify_embed_backward", mutates_args=())
def patchify_embed_backward_op(
    grad: torch.Tensor,
    images: list[torch.Tensor],
    weight: torch.Tensor,
    merge_size: int,
    mean: list[float],
    std: list[float],
    rescale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight [D, C, Tp, P, P], grad_bias [D]) from grad [N, D]."""
    return kernels.get("patchify_embed_bwd", backend)(
        grad=grad, images=images, weight=weight, merge_size=merge_size, mean=mean, std=std, rescale=rescale
    )


@patchify_embed_backward_op.register_fake
def _(grad, images, weight, merge_size, mean, std, rescale, backend):
    return torch.empty_like(weight), weight.new_empty((weight.shape[0],))


def _setup_context(ctx, inputs, output):
    images, weight, bias, merge_size, mean, std, rescale, backend = inputs
    ctx.save_for_backward(weight, *images)
    ctx.has_bias, ctx.n_images = bias is not None, len(images)
    ctx.merge_size, ctx.mean, ctx.std, ctx.rescale, ctx.backend = merge_size, mean, std, rescale, backend


def _backward(ctx, grad):
    weight, *images = ctx.saved_tensors
    gw, gb = patchify_embed_backward_op(grad.contiguous(), images, weight, ctx.merge_size, ctx.mean, ctx.std, ctx.rescale, ctx.backend)
    return (
        [None] * ctx.n_images,  # pixels are data
        gw if ctx.needs_input_grad[1] else None,
        gb if ctx.has_bias and ctx.needs_input_grad[2] else None,
        None, None, None, None, None,
    )


patchify_embed_op.register_autograd(_backward, setup_context=_setup_context)
