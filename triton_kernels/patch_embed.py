"""Triton kernels of `engine.ops.patch_embed`: Qwen-VL's PatchEmbed Conv3d as a tiled GEMM.

    out [N, D] = pixel_values [N, K] @ weight.view(D, K).T + bias         (_patch_embed_fwd_kernel)
    grad_x [N, K] = grad [N, D] @ W [D, K];  grad_W [D, K] = grad.T @ x    (_patch_embed_bwd_kernel, a strided GEMM)

fp32 accumulation; fp32 inputs use IEEE products (no TF32), to match torch's default.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels import _runtime as _triton
from triton_kernels._tiles import dot_acc, tile


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    N, D, K: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm, rn, mask_m, mask_n = tile(N, D, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptr + rn[None, :].to(tl.int64) * K + rk[:, None], mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        acc = dot_acc(acc, a, b, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * D + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _patch_embed_bwd_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    IEEE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C [M, N] fp32 (contiguous, zeroed) += A [M, K] @ B [K, N], A and B given by strides (transposes are free).

    Split-K: program (i, j, s) sums k in [s * SPLIT * BLOCK_K, (s + 1) * SPLIT * BLOCK_K) and adds it
    atomically. The reduction dim is N (patches) for grad_weight: it varies per batch, so it is a grid
    dim, not a loop bound (and D*K tiles alone would not fill a GPU).
    """
    rm, rn, mask_m, mask_n = tile(M, N, BLOCK_M, BLOCK_N)
    pid_s = tl.program_id(2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(SPLIT):
        rk = (pid_s * SPLIT + i) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :].to(tl.int64) * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot_acc(acc, a, b, IEEE)
    tl.atomic_add(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


def _blocks() -> dict:
    # The interpreter runs one program at a time: big blocks keep it fast. GPU: a standard GEMM tile.
    if _triton.interpreting():
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)


def patch_embed_fwd(*, pixel_values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """pixel_values [N, K], weight [D, C, Tp, P, P], bias [D] -> [N, D] in weight's dtype."""
    x = pixel_values.contiguous()
    w = weight.contiguous()
    N, K = x.shape
    D = w.shape[0]
    out = torch.empty((N, D), dtype=w.dtype, device=w.device)
    if N == 0 or D == 0:
        return out
    cfg = _blocks()
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_N"]))
    _patch_embed_fwd_kernel[grid](
        x, w, bias.contiguous() if bias is not None else w, out, N, D, K,
        HAS_BIAS=bias is not None, IEEE=w.dtype == torch.float32, **cfg,
    )
    return out


def _gemm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] @ b [K, N] (any strides) -> [M, N] contiguous in out_dtype, fp32 accumulation."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.zeros((M, N), dtype=torch.float32, device=a.device)
    if M and N and K:
        cfg = _blocks()
        split = 4
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"] * split))
        _patch_embed_bwd_kernel[grid](
            a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            IEEE=a.dtype == torch.float32, SPLIT=split, **cfg,
        )
    return c.to(out_dtype)


def patch_embed_bwd(*, grad: torch.Tensor, pixel_values: torch.Tensor, weight: torch.Tensor):
    """(grad_pixel_values [N, K], grad_weight [D, C, Tp, P, P], grad_bias [D]) from grad [N, D]."""
    D = weight.shape[0]
    g = grad.to(weight.dtype).contiguous()
    w2 = weight.contiguous().view(D, -1)
    x = pixel_values.to(weight.dtype).contiguous()
    gx = _gemm(g, w2, pixel_values.dtype)
    gw = _gemm(g.t(), x, weight.dtype).view(weight.shape)
    gb = grad.float().sum(0).to(weight.dtype)
    return gx, gw, gb
