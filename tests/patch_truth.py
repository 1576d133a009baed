"""fp64 truths for the patch ops, written out here (never through `engine.reference`).

- `patches64`: the image processor's pixel_values, by cutting each patch out of the image with
  explicit loops in the processor's order and normalizing it in float64.
- `conv3d64`: the model's PatchEmbed, a float64 Conv3d with kernel == stride over each patch.
- `dot_scale`: the magnitude a dot product's rounding is relative to, max_i sum_k |a_ik| |b_kj|.
And what tests/test_patch_embed.py and tests/test_patchify_embed.py set up alike:
- `skip_interpreter`: the Triton interpreter runs these ops in fp32 only;
- `make_weight`: a PatchEmbed weight [D, C, Tp, P, P] and bias [D] from the global generator.
"""
from __future__ import annotations

import pytest
import torch

import engine


def patches64(images, *, patch_size=14, temporal_patch_size=2, merge_size=2, mean=None, std=None, rescale=1 / 255):
    """images: a [C, H, W] / [B, C, H, W] tensor or a list of them -> pixel_values [N, C*Tp*P*P] float64 (CPU)."""
    P, Tp, M = patch_size, temporal_patch_size, merge_size
    items = images if isinstance(images, (list, tuple)) else [images]
    frames = [f for t in items for f in (t.unbind(0) if t.dim() == 4 else [t])]
    C = items[0].shape[-3]
    mean64 = torch.tensor(mean, dtype=torch.float64).view(C, 1, 1)
    std64 = torch.tensor(std, dtype=torch.float64).view(C, 1, 1)
    rows = []
    for img in frames:
        x = (img.detach().cpu().double() * rescale - mean64) / std64
        _, H, W = x.shape
        for by in range(H // (P * M)):  # merge blocks, row-major; patches row-major inside each block
            for bx in range(W // (P * M)):
                for my in range(M):
                    for mx in range(M):
                        y0, x0 = (by * M + my) * P, (bx * M + mx) * P
                        patch = x[:, y0:y0 + P, x0:x0 + P]  # [C, P, P]
                        rows.append(torch.stack([patch] * Tp, dim=1).reshape(-1))  # (c, t, row, col): a still clip
    if not rows:
        return torch.zeros(0, C * Tp * P * P, dtype=torch.float64)
    return torch.stack(rows)


def conv3d64(pixel_values, weight, bias=None):
    """pixel_values [N, C*Tp*P*P], weight [D, C, Tp, P, P], bias [D] -> [N, D] float64 (CPU): the Conv3d itself."""
    D, C, Tp, P, _ = weight.shape
    # no detach: autograd through it gives the Conv3d's own gradients (pass float64 leaves for those)
    x = pixel_values.cpu().double().reshape(-1, C, Tp, P, P)
    w = weight.cpu().double()
    b = None if bias is None else bias.cpu().double()
    return torch.nn.functional.conv3d(x, w, b, stride=(Tp, P, P)).reshape(-1, D)


def dot_scale(a, b) -> float:
    """max over (i, j) of sum_k |a[i, k]| |b[k, j]| (at least 1): the size of the terms of a @ b."""
    a64, b64 = a.detach().cpu().double().abs(), b.detach().cpu().double().abs()
    if a64.numel() == 0 or b64.numel() == 0:
        return 1.0
    return max(1.0, float((a64 @ b64).max()))


def skip_interpreter(backend, dtype=torch.float32):
    if backend == "triton" and engine._triton.interpreting() and dtype != torch.float32:
        pytest.skip("the Triton interpreter is tested in fp32 only (tl.dot on bf16 is wrong there)")


def make_weight(D, device, dtype=torch.float32, C=3, Tp=2, P=14, bias=True):
    w = (torch.randn(D, C, Tp, P, P, device=device) * 0.02).to(dtype)
    b = (torch.randn(D, device=device) * 0.1).to(dtype) if bias else None
    return w, b
