"""Triton kernels of `engine.ops.patchify_embed`: raw pixels -> patch embeddings, pixel_values never written.

Each program gathers its [BLOCK_M, BLOCK_K] tile of raw pixels straight from the image (patch rows
in the processor's order: `triton_kernels.patchify.patch_offsets`) and feeds tl.dot. The
normalization and the Tp repeat are folded into the weight, so K = C*P*P, half the Conv3d's:

    x_norm[c] = a[c] (x[c] - z[c]) + k[c],  a = rescale / std,  z = round(mean / rescale),  k = a z - mean / std
    Weff[d, c, p] = a[c] sum_t W[d, c, t, p],  bias_eff[d] = bias[d] + sum_c k[c] sum_{t,p} W[d, c, t, p]

(z is an integer, so uint8 pixels minus z stay exact in bf16; docs/ops.md#patchify_embed.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels import _runtime as _triton
from triton_kernels._tiles import dot_acc, tile
from triton_kernels.patchify import feature_offsets, image_dims, patch_offsets


@triton.jit
def _patchify_embed_fwd_kernel(
    img_ptr, w_ptr, bias_ptr, z_ptr, out_ptr,
    n_rows, H, W, gh, gw, D,
    C: tl.constexpr, P: tl.constexpr, M: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out [n_rows, D] = (gathered pixels - z) @ Weff.T + bias_eff; w_ptr: Weff [D, C*P*P] in the GEMM dtype."""
    K: tl.constexpr = C * P * P
    rm, rn, mask_m, mask_n = tile(n_rows, D, BLOCK_M, BLOCK_N)
    row_off = patch_offsets(rm, H, W, gh, gw, C, P, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        c, col_off = feature_offsets(rk, H, W, 1, P)  # one frame: the weight holds the Tp sum
        x = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        z = tl.load(z_ptr + c, mask=mask_k, other=0.0)
        a = tl.where(mask_m[:, None] & mask_k[None, :], x.to(tl.float32) - z[None, :], 0.0).to(w_ptr.dtype.element_ty)
        b = tl.load(w_ptr + rn[None, :].to(tl.int64) * K + rk[:, None], mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        acc = dot_acc(acc, a, b, IEEE)
    acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0)[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * D + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _patchify_embed_bwd_kernel(
    img_ptr, g_ptr, z_ptr, gw_ptr,
    n_rows, H, W, gh, gw, D,
    C: tl.constexpr, P: tl.constexpr, M: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """gWeff [D, C*P*P] fp32 += grad [n_rows, D].T @ (gathered pixels - z); grad in the GEMM dtype.

    Split over patches: program (i, j, s) sums rows [s * SPLIT * BLOCK_M, (s + 1) * SPLIT * BLOCK_M)
    and adds atomically (the patch count is a grid dim, not a loop bound).
    """
    K: tl.constexpr = C * P * P
    rd, rk, mask_d, mask_k = tile(D, K, BLOCK_D, BLOCK_K)
    c, col_off = feature_offsets(rk, H, W, 1, P)
    z = tl.load(z_ptr + c, mask=mask_k, other=0.0)
    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    pid_s = tl.program_id(2)
    for i in range(SPLIT):
        rm = (pid_s * SPLIT + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rm < n_rows
        row_off = patch_offsets(rm, H, W, gh, gw, C, P, M)
        x = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        a = tl.where(mask_m[:, None] & mask_k[None, :], x.to(tl.float32) - z[None, :], 0.0).to(g_ptr.dtype.element_ty)
        gt = tl.load(g_ptr + rd[:, None] + rm[None, :].to(tl.int64) * D, mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        acc = dot_acc(acc, gt, a, IEEE)
    tl.atomic_add(gw_ptr + rd[:, None].to(tl.int64) * K + rk[None, :], acc, mask=mask_d[:, None] & mask_k[None, :])


# ---- launchers ----


def fold(weight: torch.Tensor, bias: torch.Tensor | None, mean, std, rescale: float):
    """(Weff [D, C*P*P] fp32, bias_eff [D] fp32, z [C] fp32): x_norm = a (x - z) + k per channel, folded with the Tp sum."""
    D, C, Tp, P, _ = weight.shape
    dev = weight.device
    mean64 = torch.tensor(mean, dtype=torch.float64)
    std64 = torch.tensor(std, dtype=torch.float64)
    a = rescale / std64
    z = torch.round(mean64 / rescale) if rescale != 0 else torch.zeros_like(mean64)
    k = a * z - mean64 / std64
    ws = weight.float().sum(2)  # [D, C, P, P]
    bias_eff = ws.sum((2, 3)) @ k.float().to(dev)
    if bias is not None:
        bias_eff = bias_eff + bias.float()
    weff = (ws * a.float().to(dev).view(1, C, 1, 1)).reshape(D, C * P * P)
    return weff, bias_eff.contiguous(), z.float().to(dev)


def unfold_grad(gweff: torch.Tensor, gsum: torch.Tensor, weight: torch.Tensor, mean, std, rescale: float) -> torch.Tensor:
    """grad_weight [D, C, Tp, P, P] from gWeff [D, C*P*P] and gsum [D] (fp32): a[c] gWeff + k[c] gsum, every frame."""
    D, C, Tp, P, _ = weight.shape
    mean64 = torch.tensor(mean, dtype=torch.float64)
    std64 = torch.tensor(std, dtype=torch.float64)
    a = rescale / std64
    z = torch.round(mean64 / rescale) if rescale != 0 else torch.zeros_like(mean64)
    k = (a * z - mean64 / std64).float().to(weight.device)
    g = gweff.view(D, C, P, P) * a.float().to(weight.device).view(1, C, 1, 1) + gsum.view(D, 1, 1, 1) * k.view(1, C, 1, 1)
    return g.unsqueeze(2).expand(D, C, Tp, P, P).to(weight.dtype).contiguous()


def _mm_blocks(interp_k: int = 64) -> dict:
    if _triton.interpreting():
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=interp_k)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)


def patchify_embed_fwd(*, images: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, merge_size: int,
                       mean, std, rescale: float) -> torch.Tensor:
    """images: each [B_i, C, H_i, W_i] -> embeds [N, D] in weight's dtype."""
    D, C, Tp, P, _ = weight.shape
    weff, bias_eff, z = fold(weight, bias, mean, std, rescale)
    weff = weff.to(weight.dtype).contiguous()
    rows = [image_dims(img, P)[0] for img in images]
    out = torch.empty((sum(rows), D), dtype=weight.dtype, device=weight.device)
    cfg = _mm_blocks()
    row0 = 0
    for img, n in zip(images, rows):
        img = img.contiguous()
        n_rows, H, W, gh, gw = image_dims(img, P)
        if n_rows and D:
            grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_N"]))
            _patchify_embed_fwd_kernel[grid](
                img, weff, bias_eff, z, out[row0:], n_rows, H, W, gh, gw, D,
                C=C, P=P, M=merge_size, IEEE=weight.dtype == torch.float32, **cfg,
            )
        row0 += n
    return out


def patchify_embed_bwd(*, grad: torch.Tensor, images: list[torch.Tensor], weight: torch.Tensor, merge_size: int, mean, std, rescale: float):
    """(grad_weight [D, C, Tp, P, P], grad_bias [D]) from grad [N, D]."""
    D, C, Tp, P, _ = weight.shape
    K = C * P * P
    _, _, z = fold(weight, None, mean, std, rescale)
    g = grad.to(weight.dtype).contiguous()
    gweff = torch.zeros((D, K), dtype=torch.float32, device=weight.device)
    if _triton.interpreting():
        cfg = dict(BLOCK_D=64, BLOCK_K=64, BLOCK_M=64, SPLIT=4)
    else:
        cfg = dict(BLOCK_D=128, BLOCK_K=64, BLOCK_M=32, SPLIT=16, num_warps=8, num_stages=3)
    row0 = 0
    for img in images:
        img = img.contiguous()
        n_rows, H, W, gh, gw = image_dims(img, P)
        if n_rows and D:
            grid = (triton.cdiv(D, cfg["BLOCK_D"]), triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(n_rows, cfg["BLOCK_M"] * cfg["SPLIT"]))
            _patchify_embed_bwd_kernel[grid](
                img, g[row0:], z, gweff, n_rows, H, W, gh, gw, D,
                C=C, P=P, M=merge_size, IEEE=weight.dtype == torch.float32, **cfg,
            )
        row0 += n_rows
    gsum = grad.float().sum(0)
    return unfold_grad(gweff, gsum, weight, mean, std, rescale), gsum.to(weight.dtype)
