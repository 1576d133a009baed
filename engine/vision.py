"""The Qwen2-VL / Qwen2.5-VL vision front end: raw pixels -> patch embeddings.

    pixel_values, grid_thw = engine.ops.patchify(images)            # what Qwen2VLImageProcessor returns
    embeds = engine.ops.patch_embed(pixel_values, weight, bias)     # what the model's PatchEmbed Conv3d returns
    embeds, grid_thw = engine.ops.patchify_embed(images, weight)    # both, fused: pixel_values never exists

Contracts: `../shared/DESIGN.md` section 1. The `torch` backend is `engine.reference`; `cpp`/`cuda`
run `torch.ops.engine.{patch_embed,patchify,patchify_embed}_{fwd,bwd}` (csrc/cpu/vision.cpp,
csrc/cuda/vision.cu); `triton` runs `triton_kernels/patch_embed.py`, `triton_kernels/patchify_embed.py`.
Each fast backend goes through a custom op (`engine::patch_embed`, `engine::patchify`,
`engine::patchify_embed`) with registered fake and autograd.
"""
from __future__ import annotations

import torch

from engine import _validate, dispatch, reference
from engine.reference import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = ["patch_embed", "patchify", "patchify_embed", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

IMAGE_DTYPES = (torch.uint8, torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---- public ops ----


def patch_embed(pixel_values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Qwen-VL PatchEmbed (a Conv3d with kernel == stride) as the GEMM it is.

    Args:
        pixel_values: `[N, C*Tp*P*P]`, weight's dtype (cast first if it is not, as the model does).
        weight: `[D, C, Tp, P, P]` float32/bfloat16/float16 (`PatchEmbed.proj.weight`).
        bias: `[D]` or None.

    Returns:
        `[N, D]` in weight's dtype, differentiable in pixel_values, weight and bias.
    """
    _check_weight(weight, bias)
    _validate.check_float("pixel_values", pixel_values, ndim=2)
    _validate.check_same_device(weight=weight, pixel_values=pixel_values, bias=bias)
    K = weight[0].numel() if weight.shape[0] else weight.shape[1:].numel()
    if pixel_values.shape[1] != K:
        raise ValueError(f"pixel_values must be [N, C*Tp*P*P] = [N, {K}] for weight {tuple(weight.shape)}, got {tuple(pixel_values.shape)}")
    if pixel_values.dtype != weight.dtype:
        raise ValueError(f"pixel_values must have weight's dtype {weight.dtype}, got {pixel_values.dtype}")
    backend = dispatch.select_backend("patch_embed", weight.device.type)
    if backend == "torch":
        return reference.patch_embed(pixel_values, weight, bias)
    return patch_embed_op(pixel_values, weight, bias, backend)


def patchify(
    images,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
    rescale: float = 1 / 255,
):
    """Qwen2VLImageProcessor's `pixel_values` for images already sized to multiples of patch_size*merge_size.

    Args:
        images: `[B, C, H, W]` or `[C, H, W]` uint8 or float tensor, or a list of such tensors of
            different sizes.
        mean, std: per channel; `x = (pixel * rescale - mean) / std`.

    Returns:
        `(pixel_values [N, C*Tp*P*P] float32, grid_thw [B, 3] int64)`: rows in merge-block order,
        features (channel, frame, row, col) with the frame repeated Tp times. Not differentiable.
    """
    if len(mean) != len(std):
        raise ValueError(f"mean must have one value per channel, as std ({len(std)}), got {len(mean)}")
    imgs = _image_list(images, channels=len(mean), patch_size=patch_size, merge_size=merge_size)
    C = imgs[0].shape[1]
    _check_norm(mean, std, rescale, C)
    if temporal_patch_size < 1:
        raise ValueError(f"temporal_patch_size must be a positive int, got {temporal_patch_size}")
    grid_thw = _grid_thw(imgs, patch_size)
    backend = dispatch.select_backend("patchify", imgs[0].device.type)
    kw = dict(patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size, mean=mean, std=std, rescale=rescale)
    if backend == "torch":
        return reference.patchify(imgs, **kw)[0], grid_thw
    pv = patchify_op(imgs, patch_size, temporal_patch_size, merge_size, _floats(mean), _floats(std), float(rescale), backend)
    return pv, grid_thw


def patchify_embed(
    images,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
    rescale: float = 1 / 255,
):
    """`patch_embed(patchify(images).to(weight.dtype), weight, bias)` without ever writing pixel_values.

    Args:
        images: as in `patchify`.
        weight: `[D, C, Tp, P, P]` with Tp = temporal_patch_size, P = patch_size.
        bias: `[D]` or None.

    Returns:
        `(embeds [N, D] in weight's dtype, grid_thw [B, 3] int64)`; embeds are differentiable in weight
        and bias. The kernels fold the normalization and the Tp repeat into the weight, so the GEMM
        runs on raw pixels with K = C*P*P (half the Conv3d's).
    """
    _check_weight(weight, bias)
    D, C, Tp, P, P2 = weight.shape
    if Tp != temporal_patch_size or P != patch_size:
        raise ValueError(
            f"weight must be [D, C, temporal_patch_size={temporal_patch_size}, patch_size={patch_size}, patch_size], got {tuple(weight.shape)}"
        )
    imgs = _image_list(images, channels=C, patch_size=patch_size, merge_size=merge_size)
    _validate.check_same_device(weight=weight, images=imgs[0], bias=bias)
    _check_norm(mean, std, rescale, C)
    grid_thw = _grid_thw(imgs, patch_size)
    backend = dispatch.select_backend("patchify_embed", weight.device.type)
    kw = dict(patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size, mean=mean, std=std, rescale=rescale)
    if backend == "torch":
        return reference.patchify_embed(imgs, weight, bias, **kw)[0], grid_thw
    out = patchify_embed_op(imgs, weight, bias, merge_size, _floats(mean), _floats(std), float(rescale), backend)
    return out, grid_thw




# ---- boundary checks ----


def _check_weight(weight, bias) -> None:
    _validate.check_float("weight", weight, ndim=5)
    if weight.shape[3] != weight.shape[4]:
        raise ValueError(f"weight must be [D, C, Tp, P, P] with square patches, got {tuple(weight.shape)}")
    if bias is not None:
        _validate.check_float("bias", bias, ndim=1)
        _validate.check_shape("bias", bias, (weight.shape[0],), "[D] of weight")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")


def _check_norm(mean, std, rescale, C) -> None:
    if len(mean) != C:
        raise ValueError(f"mean must have one value per channel ({C}), got {len(mean)}")
    if len(std) != C or any(float(s) == 0.0 for s in std):
        raise ValueError(f"std must have {C} nonzero values, got {tuple(std)}")
    if not float("-inf") < float(rescale) < float("inf"):
        raise ValueError(f"rescale must be finite, got {rescale}")


def _image_list(images, *, channels: int | None, patch_size: int, merge_size: int) -> list[torch.Tensor]:
    """images -> list of [B_i, C, H_i, W_i] tensors, each checked (ValueError naming `images`).
    `channels`: what C must be (the weight's), or None: the first image's (then mean/std are checked)."""
    if patch_size < 1 or merge_size < 1:
        raise ValueError(f"patch_size and merge_size must be positive, got {patch_size}, {merge_size}")
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("images must hold at least one image")
    block = patch_size * merge_size
    out = []
    for i, t in enumerate(items):
        name = "images" if len(items) == 1 and not isinstance(images, (list, tuple)) else f"images[{i}]"
        _validate.check_tensor(name, t, dtypes=IMAGE_DTYPES)
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [C, H, W] or [B, C, H, W], got shape {tuple(t.shape)}")
        B, C, H, W = t.shape
        if channels is None:
            channels = C
        if C != channels:
            raise ValueError(f"{name} must have {channels} channels (dim -3), got {C} (shape {tuple(t.shape)})")
        if H < block or W < block:
            raise ValueError(f"{name} is {H}x{W}, smaller than one merge block ({block}x{block} = patch_size*merge_size)")
        if H % block or W % block:
            raise ValueError(f"{name} is {H}x{W}: height and width must be multiples of patch_size*merge_size = {block} (resize first: engine.image.smart_resize)")
        if out and t.device != out[0].device:
            raise ValueError(f"{name} is on {t.device} but images[0] is on {out[0].device}")
        out.append(t)
    return out


def _grid_thw(imgs: list[torch.Tensor], patch_size: int) -> torch.Tensor:
    rows = [[1, t.shape[2] // patch_size, t.shape[3] // patch_size] for t in imgs for _ in range(t.shape[0])]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(imgs[0].device)


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def _n_patches(imgs, patch_size: int) -> int:
    return sum(t.shape[0] * (t.shape[2] // patch_size) * (t.shape[3] // patch_size) for t in imgs)


def _require_extension() -> None:
    from engine import _extension

    ok, why = _extension.status()
    if not ok:
        raise RuntimeError(f"the C++ extension is not available: {why}")


# ---- custom op: patch_embed ----


@torch.library.custom_op("engine::patch_embed", mutates_args=())
def patch_embed_op(pixel_values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """pixel_values [N, K], weight [D, C, Tp, P, P], bias [D] -> [N, D] (weight's dtype)."""
    if backend in ("cpp", "cuda"):
        _require_extension()
        return torch.ops.engine.patch_embed_fwd(pixel_values, weight, bias)
    if backend == "triton":
        from triton_kernels.patch_embed import patch_embed_fwd

        return patch_embed_fwd(pixel_values=pixel_values, weight=weight, bias=bias)
    raise ValueError(f"patch_embed has no kernel for backend {backend!r}")


@patch_embed_op.register_fake
def _(pixel_values, weight, bias, backend):
    return pixel_values.new_empty((pixel_values.shape[0], weight.shape[0]), dtype=weight.dtype)


@torch.library.custom_op("engine::patch_embed_backward", mutates_args=())
def patch_embed_backward_op(
    grad: torch.Tensor, pixel_values: torch.Tensor, weight: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_pixel_values [N, K], grad_weight [D, C, Tp, P, P], grad_bias [D]) from grad [N, D]."""
    if backend in ("cpp", "cuda"):
        _require_extension()
        return torch.ops.engine.patch_embed_bwd(grad, pixel_values, weight)
    if backend == "triton":
        from triton_kernels.patch_embed import patch_embed_bwd

        return patch_embed_bwd(grad=grad, pixel_values=pixel_values, weight=weight)
    raise ValueError(f"patch_embed has no kernel for backend {backend!r}")


@patch_embed_backward_op.register_fake
def _(grad, pixel_values, weight, backend):
    return torch.empty_like(pixel_values), torch.empty_like(weight), weight.new_empty((weight.shape[0],))


def _patch_embed_setup(ctx, inputs, output):
    pixel_values, weight, bias, backend = inputs
    ctx.save_for_backward(pixel_values, weight)
    ctx.has_bias, ctx.backend = bias is not None, backend


def _patch_embed_backward(ctx, grad):
    pixel_values, weight = ctx.saved_tensors
    gx, gw, gb = patch_embed_backward_op(grad.contiguous(), pixel_values, weight, ctx.backend)
    return (
        gx if ctx.needs_input_grad[0] else None,
        gw if ctx.needs_input_grad[1] else None,
        gb if ctx.has_bias and ctx.needs_input_grad[2] else None,
        None,
    )


patch_embed_op.register_autograd(_patch_embed_backward, setup_context=_patch_embed_setup)


# ---- custom op: patchify (not differentiable: pixels are data) ----


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
    if backend in ("cpp", "cuda"):
        _require_extension()
        return torch.ops.engine.patchify_fwd(images, patch_size, temporal_patch_size, merge_size, mean, std, rescale)
    if backend == "triton":
        from triton_kernels.patchify_embed import patchify_fwd

        return patchify_fwd(images=images, patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size,
                            mean=mean, std=std, rescale=rescale)
    raise ValueError(f"patchify has no kernel for backend {backend!r}")


@patchify_op.register_fake
def _(images, patch_size, temporal_patch_size, merge_size, mean, std, rescale, backend):
    C = images[0].shape[1]
    return images[0].new_empty((_n_patches(images, patch_size), C * temporal_patch_size * patch_size * patch_size), dtype=torch.float32)


# ---- custom op: patchify_embed ----


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
    if backend in ("cpp", "cuda"):
        _require_extension()
        return torch.ops.engine.patchify_embed_fwd(images, weight, bias, merge_size, mean, std, rescale)
    if backend == "triton":
        from triton_kernels.patchify_embed import patchify_embed_fwd

        return patchify_embed_fwd(images=images, weight=weight, bias=bias, merge_size=merge_size, mean=mean, std=std, rescale=rescale)
    raise ValueError(f"patchify_embed has no kernel for backend {backend!r}")


@patchify_embed_op.register_fake
def _(images, weight, bias, merge_size, mean, std, rescale, backend):
    return weight.new_empty((_n_patches(images, weight.shape[3]), weight.shape[0]))


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
    if backend in ("cpp", "cuda"):
        _require_extension()
        return torch.ops.engine.patchify_embed_bwd(grad, images, weight, merge_size, mean, std, rescale)
    if backend == "triton":
        from triton_kernels.patchify_embed import patchify_embed_bwd

        return patchify_embed_bwd(grad=grad, images=images, weight=weight, merge_size=merge_size, mean=mean, std=std, rescale=rescale)
    raise ValueError(f"patchify_embed has no kernel for backend {backend!r}")


@patchify_embed_backward_op.register_fake
def _(grad, images, weight, merge_size, mean, std, rescale, backend):
    return torch.empty_like(weight), weight.new_empty((weight.shape[0],))


def _patchify_embed_setup(ctx, inputs, output):
    images, weight, bias, merge_size, mean, std, rescale, backend = inputs
    ctx.save_for_backward(weight, *images)
    ctx.has_bias, ctx.n_images = bias is not None, len(images)
    ctx.merge_size, ctx.mean, ctx.std, ctx.rescale, ctx.backend = merge_size, mean, std, rescale, backend


def _patchify_embed_backward(ctx, grad):
    weight, *images = ctx.saved_tensors
    gw, gb = patchify_embed_backward_op(grad.contiguous(), images, weight, ctx.merge_size, ctx.mean, ctx.std, ctx.rescale, ctx.backend)
    return (
        [None] * ctx.n_images,  # pixels are data
        gw if ctx.needs_input_grad[1] else None,
        gb if ctx.has_bias and ctx.needs_input_grad[2] else None,
        None, None, None, None, None,
    )


patchify_embed_op.register_autograd(_patchify_embed_backward, setup_context=_patchify_embed_setup)
