"""Triton kernel of `engine.ops.patchify`: images -> the image processor's `pixel_values`.

Patch row n of an image [B, C, H, W] (grid gh x gw, merge size M, Wb = gw / M) is, in the image
processor's order: b = n // (gh gw), then block (bh, bw) = divmod(r // M^2, Wb), then (mh, mw) =
divmod(r % M^2, M); its top-left pixel is row (bh M + mh) P, column (bw M + mw) P. `patch_offsets`
computes it; triton_kernels/patchify_embed.py gathers its pixels with the same function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels import _runtime as _triton
from triton_kernels._tiles import tile


@triton.jit
def patch_offsets(rm, H, W, gh, gw, C: tl.constexpr, P: tl.constexpr, M: tl.constexpr):
    """Pixel offset of the top-left corner of each patch row rm of a [B, C, H, W] image tensor."""
    per_image = gh * gw
    b = rm // per_image
    r = rm % per_image
    blk = r // (M * M)
    within = r % (M * M)
    Wb = gw // M
    y = ((blk // Wb) * M + within // M) * P
    x = ((blk % Wb) * M + within % M) * P
    return b.to(tl.int64) * C * H * W + y.to(tl.int64) * W + x


@triton.jit
def feature_offsets(rf, H, W, T: tl.constexpr, P: tl.constexpr):
    """Feature columns rf = (c, t, ph, pw) of a patch row -> (channel c, pixel offset from the patch's
    top-left corner in a [B, C, H, W] image tensor); all T frames read the same pixel."""
    c = rf // (T * P * P)
    pq = rf % (P * P)
    return c, c.to(tl.int64) * H * W + (pq // P) * W + pq % P


@triton.jit
def _patchify_fwd_kernel(
    img_ptr, mean_ptr, std_ptr, out_ptr,
    n_rows, H, W, gh, gw, rescale_ptr,
    C: tl.constexpr, T: tl.constexpr, P: tl.constexpr, M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """pixel_values [n_rows, C*T*P*P] fp32: features (c, t, ph, pw), the frame repeated T times."""
    F: tl.constexpr = C * T * P * P
    rm, rf, mask_m, mask_f = tile(n_rows, F, BLOCK_M, BLOCK_F)
    row_off = patch_offsets(rm, H, W, gh, gw, C, P, M)
    c, col_off = feature_offsets(rf, H, W, T, P)
    mask = mask_m[:, None] & mask_f[None, :]
    x = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=mask, other=0)
    m = tl.load(mean_ptr + c, mask=mask_f, other=0.0)
    s = tl.load(std_ptr + c, mask=mask_f, other=1.0)
    # the image processor rescales in float64 and rounds once to float32, then normalizes in float32:
    # the factor arrives as a float64 tensor (a Python float argument would be passed as fp32), and
    # the division rounds to nearest (Triton's `/` on fp32 is the approximate div.full.f32)
    v = (x.to(tl.float64) * tl.load(rescale_ptr)).to(tl.float32)
    v = tl.math.div_rn(v - m[None, :], s[None, :])
    tl.store(out_ptr + rm[:, None].to(tl.int64) * F + rf[None, :], v, mask=mask)


# ---- launcher ----


def image_dims(img: torch.Tensor, P: int):
    """[B, C, H, W] image, patch size P -> (patch rows B*gh*gw, H, W, gh, gw)."""
    B, C, H, W = img.shape
    return B * (H // P) * (W // P), H, W, H // P, W // P


def patchify_fwd(*, images: list[torch.Tensor], patch_size: int, temporal_patch_size: int, merge_size: int, mean, std,
                 rescale: float) -> torch.Tensor:
    """images: each [B_i, C, H_i, W_i] -> pixel_values [N, C*Tp*P*P] fp32."""
    P, T = patch_size, temporal_patch_size
    C = images[0].shape[1]
    dev = images[0].device
    rows = [image_dims(img, P)[0] for img in images]
    F = C * T * P * P
    out = torch.empty((sum(rows), F), dtype=torch.float32, device=dev)
    m = torch.tensor(mean, dtype=torch.float32, device=dev)
    s = torch.tensor(std, dtype=torch.float32, device=dev)
    rescale64 = torch.tensor([float(rescale)], dtype=torch.float64, device=dev)
    BLOCK_M, BLOCK_F = (64, 1024) if _triton.interpreting() else (16, 256)
    row0 = 0
    for img, n in zip(images, rows):
        img = img.contiguous()
        n_rows, H, W, gh, gw = image_dims(img, P)
        if n_rows:
            grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(F, BLOCK_F))
            _patchify_fwd_kernel[grid](img, m, s, out[row0:], n_rows, H, W, gh, gw, rescale64,
                                       C=C, T=T, P=P, M=merge_size, BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F)
        row0 += n
    return out
