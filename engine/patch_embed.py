"""`engine.ops.patch_embed`: Qwen2-VL / Qwen2.5-VL's PatchEmbed (a Conv3d with kernel == stride) as a GEMM.

    embeds = engine.ops.patch_embed(pixel_values, weight, bias)   # = model.visual.patch_embed(pixel_values)

Contract: docs/ops.md#patch_embed. The `torch` backend is `engine.reference.patch_embed`; the fast
ones run the kernels `patch_embed_fwd` / `patch_embed_bwd` (csrc/cpu/patch_embed.cpp,
csrc/cuda/patch_embed.cu, triton_kernels/patch_embed.py) through `engine.kernels`, inside the
custom op `engine::patch_embed` with a registered fake and autograd.
"""
from __future__ import annotations

import torch

from engine import _validate, dispatch, kernels, reference

__all__ = ["patch_embed", "check_weight"]


def patch_embed(pixel_values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Qwen-VL PatchEmbed (a Conv3d with kernel == stride) as the GEMM it is.

    Args:
        pixel_values: `[N, C*Tp*P*P]`, weight's dtype (cast first if it is not, as the model does).
        weight: `[D, C, Tp, P, P]` float32/bfloat16/float16 (`PatchEmbed.proj.weight`).
        bias: `[D]` or None.

    Returns:
        `[N, D]` in weight's dtype, differentiable in pixel_values, weight and bias.
    """
    check_weight(weight, bias)
    _validate.check_float("pixel_values", pixel_values, ndim=2)
    _validate.check_same_device(weight=weight, pixel_values=pixel_values, bias=bias)
    K = weight.shape[1:].numel()
    if pixel_values.shape[1] != K:
        raise ValueError(f"pixel_values must be [N, C*Tp*P*P] = [N, {K}] for weight {tuple(weight.shape)}, got {tuple(pixel_values.shape)}")
    if pixel_values.dtype != weight.dtype:
        raise ValueError(f"pixel_values must have weight's dtype {weight.dtype}, got {pixel_values.dtype}")
    backend = dispatch.select_backend("patch_embed", weight.device.type)
    if backend == "torch":
        return reference.patch_embed(pixel_values, weight, bias)
    return patch_embed_op(pixel_values, weight, bias, backend)


def check_weight(weight, bias) -> None:
    """weight `[D, C, Tp, P, P]` float with square patches; bias `[D]` of its dtype, or None.
    Shared with engine/patchify_embed.py, which takes the same weight."""
    _validate.check_float("weight", weight, ndim=5)
    if weight.shape[3] != weight.shape[4]:
        raise ValueError(f"weight must be [D, C, Tp, P, P] with square patches, got {tuple(weight.shape)}")
    if bias is not None:
        _validate.check_float("bias", bias, ndim=1)
        _validate.check_shape("bias", bias, (weight.shape[0],), "[D] of weight")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")


# ---- custom op: forward, backward, fake, autograd ----


@torch.library.custom_op("engine::patch_embed", mutates_args=())
def patch_embed_op(pixel_values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """pixel_values [N, K], weight [D, C, Tp, P, P], bias [D] -> [N, D] (weight's dtype)."""
    return kernels.get("patch_embed_fwd", backend)(pixel_values=pixel_values, weight=weight, bias=bias)


@patch_embed_op.register_fake
def _(pixel_values, weight, bias, backend):
    return pixel_values.new_empty((pixel_values.shape[0], weight.shape[0]), dtype=weight.dtype)


@torch.library.custom_op("engine::patch_embed_backward", mutates_args=())
def patch_embed_backward_op(
    grad: torch.Tensor, pixel_values: torch.Tensor, weight: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_pixel_values [N, K], grad_weight [D, C, Tp, P, P], grad_bias [D]) from grad [N, D]."""
    return kernels.get("patch_embed_bwd", backend)(grad=grad, pixel_values=pixel_values, weight=weight)


@patch_embed_backward_op.register_fake
def _(grad, pixel_values, weight, backend):
    return torch.empty_like(pixel_values), torch.empty_like(weight), weight.new_empty((weight.shape[0],))


def _setup_context(ctx, inputs, output):
    pixel_values, weight, bias, backend = inputs
    ctx.save_for_backward(pixel_values, weight)
    ctx.has_bias, ctx.backend = bias is not None, backend


def _backward(ctx, grad):
    pixel_values, weight = ctx.saved_tensors
    gx, gw, gb = patch_embed_backward_op(grad.contiguous(), pixel_values, weight, ctx.backend)
    return (
        gx if ctx.needs_input_grad[0] else None,
        gw if ctx.needs_input_grad[1] else None,
        gb if ctx.has_bias and ctx.needs_input_grad[2] else None,
        None,
    )


patch_embed_op.register_autograd(_backward, setup_context=_setup_context)
