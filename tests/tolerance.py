"""Tolerances anchored to an fp64 truth, for the kernel AND for the reference.

Every accuracy test computes a truth in fp64 with code written in the test itself (never by
calling `engine.reference`), then bounds two errors against it with the same bound:

    assert_matches_fp64("logp", out, truth64, torch_out=reference_out, dtype=torch.float32, k=8)

- `out`: the backend under test; `torch_out`: `engine.reference`'s result on the same inputs.
  Bounding the reference too is what makes a wrong reference fail: a test that only compared the
  kernel with the reference's own error would pass both a wrong reference and a kernel that
  copies it.
- the bound is `k * eps(dtype) * scale`: `dtype` is the precision the result is computed or stored
  in (fp32 for log-probs, losses and metrics, which the ops accumulate and return in fp32; the
  input dtype for gradients, which are returned in it), `scale` the magnitude that rounding is
  relative to (default: max |truth|, at least 1). `k` absorbs the accumulation length; each test
  states why its `k` is what it is.
- non-finite truth entries (inf, -inf, nan) must be matched exactly.
"""
from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over the entries where b is finite (0 when there are none)."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    finite = torch.isfinite(b64)
    if not finite.any():
        return 0.0
    return float((a64[finite] - b64[finite]).abs().max())


def fp64_bound(truth64: torch.Tensor, *, dtype: torch.dtype, k: float, scale: float | None = None) -> float:
    """k * eps(dtype) * scale; scale defaults to max(1, max |finite truth|)."""
    if scale is None:
        t = truth64.detach().double().cpu()
        t = t[torch.isfinite(t)]
        scale = max(1.0, float(t.abs().max())) if t.numel() else 1.0
    return k * torch.finfo(dtype).eps * scale


def _check_nonfinite(name: str, out: torch.Tensor, truth64: torch.Tensor) -> None:
    nonfinite = ~torch.isfinite(truth64.detach().cpu())
    if nonfinite.any():
        o, r = out.detach().cpu()[nonfinite].double(), truth64.detach().cpu()[nonfinite].double()
        same = (o == r) | (torch.isnan(o) & torch.isnan(r))
        assert bool(same.all()), f"{name}: non-finite entries differ: {o[~same][:5]} vs {r[~same][:5]}"


def assert_matches_fp64(
    name: str,
    out: torch.Tensor,
    truth64: torch.Tensor,
    *,
    dtype: torch.dtype,
    k: float = 8.0,
    scale: float | None = None,
    torch_out: torch.Tensor | None = None,
) -> None:
    """`out` and (when given) `torch_out` both within `fp64_bound(truth64, dtype=dtype, k=k, scale=scale)`."""
    bound = fp64_bound(truth64, dtype=dtype, k=k, scale=scale)
    for who, value in (("kernel", out), ("reference", torch_out)):
        if value is None:
            continue
        assert tuple(value.shape) == tuple(truth64.shape), (
            f"{name} ({who}): shape {tuple(value.shape)} != {tuple(truth64.shape)}"
        )
        _check_nonfinite(f"{name} ({who})", value, truth64)
        err = max_err(value, truth64)
        assert err <= bound, (
            f"{name} ({who}): max error {err:.3e} against fp64 > bound {bound:.3e} "
            f"({k} x eps({dtype}) x scale)"
        )
