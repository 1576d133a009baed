"""`grpo_loss`: EasyR1's clipped policy loss with a KL term, fused into one forward and one backward.

    loss, metrics = engine.ops.grpo_loss(logp, adv, mask, old_logp=old, ref_logp=ref, kl_coef=1e-2)

Contract: docs/ops.md#grpo_loss; the readable version is `engine.reference.grpo_loss` (the `torch`
backend). The other backends run the kernels `grpo_loss_fwd` / `grpo_loss_bwd` through
`engine.kernels` (csrc/cpu/grpo_loss.cpp, csrc/cuda/grpo_loss.cu, triton_kernels/grpo_loss.py): one
fused forward (per-token terms and every masked sum in one pass over the tokens; per-row partial
sums, then a fixed-order sum over rows, so results are bitwise reproducible whatever the thread
count) and one fused backward that recomputes the per-token derivative and writes dlogp in logp's
dtype. The forward saves one per-row weight (the aggregation's d loss / d row sum), so the backward
needs no knowledge of `loss_agg`.

Gradient flows into `logp` only: `old_logp`, `ref_logp`, `advantages` and `mask` are constants
(detached), as in EasyR1, where they come from no-grad rollouts.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from engine import _validate, dispatch, kernels, reference
from engine._validate import FLOAT_DTYPES, check_float, check_same_device, check_shape, check_tensor
from engine.grpo_options import KL_TYPES, LOSS_AGGS

__all__ = ["grpo_loss"]

METRIC_NAMES = ("clipfrac_high", "clipfrac_low", "ppo_kl", "kl")  # the order of the kernels' metrics [4]
_ADV_DTYPES = FLOAT_DTYPES + (torch.float64,)  # cast to fp32: advantages are per row, cheap
_MASK_DTYPES = _ADV_DTYPES + (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

def grpo_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: Optional[float] = 3.0,
    kl_coef: float = 0.0,
    kl_type: str = "low_var_kl",
    loss_agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logp: [B, T] float, advantages: [B] or [B, T], mask: [B, T] bool or float weights ->
    (loss: 0-dim fp32, metrics: {clipfrac_high, clipfrac_low, ppo_kl, kl}: 0-dim fp32, detached).

    old_logp, ref_logp: [B, T] or None (None: old = logp.detach(); no KL term, kl_coef unused).
    kl_type: low_var_kl | kl | abs | mse; loss_agg: token-mean | seq-mean-token-mean |
    seq-mean-token-sum | seq-mean-token-sum-norm; dual_clip: a float > 1 or None (off).
    Semantics and edge cases (empty masks give 0; B = 0 gives 0): `engine.reference.grpo_loss`.
    Differentiable in logp only; the other tensors are treated as constants.
    """
    _check_grpo_args(logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip, kl_coef, kl_type, loss_agg)
    backend = dispatch.select_backend("grpo_loss", logp.device.type)
    if backend == "torch":
        return reference.grpo_loss(
            logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, kl_coef=kl_coef, kl_type=kl_type, loss_agg=loss_agg,
        )
    # Kernels take logp/old/ref in one dtype (mixed: all fp32; autograd casts dlogp back),
    # advantages in fp32, and the mask as bool or fp32.
    dtype = logp.dtype
    if any(t is not None and t.dtype != dtype for t in (old_logp, ref_logp)):
        dtype = torch.float32
    logp_k = logp.to(dtype).contiguous()
    old_k = None if old_logp is None else old_logp.detach().to(dtype).contiguous()
    ref_k = None if ref_logp is None else ref_logp.detach().to(dtype).contiguous()
    adv_k = advantages.detach().to(torch.float32).contiguous()
    mask_k = mask.detach()
    if mask_k.dtype != torch.bool:
        mask_k = mask_k.to(torch.float32)
    mask_k = mask_k.contiguous()
    args = (
        logp_k, adv_k, mask_k, old_k, ref_k, float(clip_low), float(clip_high),
        None if dual_clip is None else float(dual_clip), float(kl_coef), kl_type, loss_agg, backend,
    )
    if torch.compiler.is_compiling():
        loss, metrics, _ = _grpo_loss_op(*args)  # the custom op: traceable, with a fake
    else:
        # Eager: the same kernels through a plain autograd.Function, which skips the custom op's
        # Python round trip through the dispatcher (about 80 us of a 200 us step at B=64, T=2048).
        loss, metrics = _GrpoLossEager.apply(*args)
    return loss, dict(zip(METRIC_NAMES, metrics.detach().unbind(0)))  # metrics carry no gradient


def _check_mask_values(mask) -> None:
    """A non-bool mask holds weights: each must be finite and >= 0 (a NaN or negative weight is refused).
    One reduction (a host sync); skipped for bool masks and under torch.compile."""
    if mask.dtype == torch.bool or mask.numel() == 0 or not _validate.data_checks_on():
        return
    bad = mask < 0
    if mask.is_floating_point():
        bad = bad | ~torch.isfinite(mask)
    if bool(bad.any()):
        b, t = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"mask must hold finite weights >= 0, got {mask[b, t].item()} at [{b}, {t}]")


def _check_grpo_args(logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip, kl_coef, kl_type, loss_agg):
    check_float("logp", logp, ndim=2)
    B, T = logp.shape
    check_tensor("advantages", advantages, dtypes=_ADV_DTYPES)
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}) (per sequence or per token), got {tuple(advantages.shape)}")
    check_tensor("mask", mask, dtypes=_MASK_DTYPES)
    check_shape("mask", mask, (B, T), "like logp")
    _check_mask_values(mask)
    if old_logp is not None:
        check_float("old_logp", old_logp)
        check_shape("old_logp", old_logp, (B, T), "like logp")
    if ref_logp is not None:
        check_float("ref_logp", ref_logp)
        check_shape("ref_logp", ref_logp, (B, T), "like logp")
    check_same_device(logp=logp, advantages=advantages, mask=mask, old_logp=old_logp, ref_logp=ref_logp)
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if not (0.0 <= clip_low < 1.0):
        raise ValueError(f"clip_low must lie in [0, 1), got {clip_low}")
    if not (0.0 <= clip_high < math.inf):
        raise ValueError(f"clip_high must be a finite number >= 0, got {clip_high}")
    if dual_clip is not None and not (1.0 < dual_clip < math.inf):
        raise ValueError(f"dual_clip must be a finite number > 1 or None, got {dual_clip}")
    if not math.isfinite(kl_coef):
        raise ValueError(f"kl_coef must be finite, got {kl_coef}")


@torch.library.custom_op("engine::grpo_loss", mutates_args=())
def _grpo_loss_op(
    logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, old_logp: Optional[torch.Tensor],
    ref_logp: Optional[torch.Tensor], clip_low: float, clip_high: float, dual_clip: Optional[float],
    kl_coef: float, kl_type: str, loss_agg: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss [], metrics [4] in METRIC_NAMES order, row_weight [B]: d loss / d (row sum of the terms))."""
    return _fwd_impl(logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip, kl_coef, kl_type, loss_agg,
                     backend)


def _fwd_impl(logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip, kl_coef, kl_type, loss_agg, backend):
    return kernels.get("grpo_loss_fwd", backend)(
        logp=logp, advantages=advantages, mask=mask, old_logp=old_logp, ref_logp=ref_logp, clip_low=clip_low,
        clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_type=kl_type, loss_agg=loss_agg,
    )


@_grpo_loss_op.register_fake
def _(logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip, kl_coef, kl_type, loss_agg, backend):
    f32 = torch.float32
    return logp.new_empty((), dtype=f32), logp.new_empty((4,), dtype=f32), logp.new_empty((logp.shape[0],), dtype=f32)


@torch.library.custom_op("engine::grpo_loss_backward", mutates_args=())
def _grpo_loss_backward_op(
    grad_loss: torch.Tensor, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor], row_weight: torch.Tensor,
    clip_low: float, clip_high: float, dual_clip: Optional[float], kl_coef: float, kl_type: str, backend: str,
) -> torch.Tensor:
    """-> dlogp [B, T] in logp's dtype."""
    return _bwd_impl(grad_loss, logp, advantages, mask, old_logp, ref_logp, row_weight, clip_low, clip_high, dual_clip,
                     kl_coef, kl_type, backend)


def _bwd_impl(grad_loss, logp, advantages, mask, old_logp, ref_logp, row_weight, clip_low, clip_high, dual_clip, kl_coef,
              kl_type, backend):
    return kernels.get("grpo_loss_bwd", backend)(
        grad_loss=grad_loss, logp=logp, advantages=advantages, mask=mask, old_logp=old_logp, ref_logp=ref_logp,
        row_weight=row_weight, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
        kl_type=kl_type,
    )


@_grpo_loss_backward_op.register_fake
def _(grad_loss, logp, advantages, mask, old_logp, ref_logp, row_weight, clip_low, clip_high, dual_clip, kl_coef, kl_type, backend):
    return torch.empty_like(logp)


def _grpo_setup_context(ctx, inputs, output):
    logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip, kl_coef, kl_type, loss_agg, backend = inputs
    ctx.save_for_backward(logp, advantages, mask, old_logp, ref_logp, output[2])
    ctx.clip_low, ctx.clip_high, ctx.dual_clip = clip_low, clip_high, dual_clip
    ctx.kl_coef, ctx.kl_type, ctx.backend = kl_coef, kl_type, backend


def _grpo_backward(ctx, grad_loss, grad_metrics, grad_row_weight):
    logp, advantages, mask, old_logp, ref_logp, row_weight = ctx.saved_tensors
    dlogp = _grpo_loss_backward_op(
        grad_loss.contiguous(), logp, advantages, mask, old_logp, ref_logp, row_weight, ctx.clip_low, ctx.clip_high,
        ctx.dual_clip, ctx.kl_coef, ctx.kl_type, ctx.backend,
    )
    return dlogp, None, None, None, None, None, None, None, None, None, None, None


_grpo_loss_op.register_autograd(_grpo_backward, setup_context=_grpo_setup_context)


class _GrpoLossEager(torch.autograd.Function):
    """The eager path: `_fwd_impl` / `_bwd_impl` (the custom ops' bodies) with the same saved values."""

    @staticmethod
    def forward(ctx, logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip, kl_coef, kl_type, loss_agg,
                backend):
        loss, metrics, row_weight = _fwd_impl(logp, advantages, mask, old_logp, ref_logp, clip_low, clip_high, dual_clip,
                                              kl_coef, kl_type, loss_agg, backend)
        ctx.save_for_backward(logp, advantages, mask, old_logp, ref_logp, row_weight)
        ctx.clip_low, ctx.clip_high, ctx.dual_clip = clip_low, clip_high, dual_clip
        ctx.kl_coef, ctx.kl_type, ctx.backend = kl_coef, kl_type, backend
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        logp, advantages, mask, old_logp, ref_logp, row_weight = ctx.saved_tensors
        dlogp = _bwd_impl(grad_loss.contiguous(), logp, advantages, mask, old_logp, ref_logp, row_weight, ctx.clip_low,
                          ctx.clip_high, ctx.dual_clip, ctx.kl_coef, ctx.kl_type, ctx.backend)
        return (dlogp,) + (None,) * 11

