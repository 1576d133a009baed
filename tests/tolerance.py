"""Tolerances measured against PyTorch's own error in the same dtype (flash-attention style).

A kernel output passes when its error against an fp64 evaluation is no worse than `factor` times
the error of the plain PyTorch computation in the input dtype, plus a small absolute floor.
"""
from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over finite entries of b (inf/-inf must match exactly; checked elsewhere)."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    finite = torch.isfinite(b64)
    if not finite.any():
        return 0.0
    return float((a64[finite] - b64[finite]).abs().max())


def assert_no_worse_than_torch(
    name: str, out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor, *, factor: float = 2.0, floor: float = 1e-6
) -> None:
    """`out` (kernel) vs `ref64` (fp64 truth), bounded by `factor` x the error of `torch_out`."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    nonfinite = ~torch.isfinite(ref64.detach().cpu())
    if nonfinite.any():
        o, r = out.detach().cpu()[nonfinite].double(), ref64.detach().cpu()[nonfinite].double()
        same = (o == r) | (torch.isnan(o) & torch.isnan(r))
        assert bool(same.all()), f"{name}: non-finite entries differ: {o[~same][:5]} vs {r[~same][:5]}"
    err, torch_err = max_err(out, ref64), max_err(torch_out, ref64)
    # Two fp32 ulps of the largest value: on a few entries torch can land within an ulp of the
    # truth by luck, and "2x a lucky zero" would demand better than fp32 accumulation can give.
    finite_ref = ref64.detach().double().cpu()[torch.isfinite(ref64.detach().cpu())]
    ulp_floor = 2 * torch.finfo(torch.float32).eps * (float(finite_ref.abs().max()) if finite_ref.numel() else 0.0)
    bound = factor * torch_err + floor + ulp_floor
    assert err <= bound, (
        f"{name}: max error {err:.3e} > {factor} x torch's {torch_err:.3e} + {floor:.0e} + 2 fp32 ulps ({ulp_floor:.1e})"
    )
