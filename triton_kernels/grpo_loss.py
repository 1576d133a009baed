"""GRPO loss (EasyR1's clipped policy loss + KL) in Triton: fused forward and backward.

Forward, two stages, no atomics, so results are bitwise reproducible:
  1. `_grpo_loss_fwd_kernel`, one program per row: the six masked row sums (pg, kl, mask,
     clip-high hits, dual-clip hits, old - logp), accumulated over the row in a fixed order.
  2. `_grpo_loss_finalize_kernel`, one program: sums the rows in a fixed order, applies the
     aggregation (`loss_agg`) and writes loss, metrics and each row's gradient weight.
Backward: `_grpo_loss_bwd_kernel`, elementwise over (row, block of tokens):
  dlogp = grad_loss * row_weight[b] * mask * d(pg + kl_coef * kl)/dlogp, recomputed from the inputs.
Semantics: docs/ops.md#grpo_loss (readable version: `engine.reference.grpo_loss`); the per-token
math and its autograd conventions (clamp passes the gradient at its bounds, max/min split it on
ties) as in `csrc/grpo_math.h`.
"""
import torch
import triton
import triton.language as tl

from triton_kernels import _runtime as _triton

# Loops run a constexpr number of blocks (N_ITERS = cdiv(T, BLOCK_T), N_B_ITERS = cdiv(B, BLOCK_B)):
# the interpreter (Triton 3.6 with numpy >= 2.4) cannot use a runtime scalar as a `range` bound,
# and on a GPU the count takes few values (T <= 2048 gives 1 or 2), so few compiles.

# option name -> the code the kernels branch on. A copy (triton_kernels must not import engine) of
# engine/grpo_options.py, whose order is the code; tests/test_grpo_options.py keeps them equal.
KL_TYPES = {"low_var_kl": 0, "kl": 1, "abs": 2, "mse": 3}
LOSS_AGGS = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3}


@triton.jit
def _pg_terms(lp, old, a, lo, hi, dual, HAS_DUAL: tl.constexpr):
    """-> (pg after the dual clip, clip-high hit, dual-clip hit, d pg / d logp)."""
    lr = lp - old
    ratio = tl.exp(tl.minimum(tl.maximum(lr, -20.0), 20.0))
    na = -a
    pg1 = na * ratio
    pg2 = na * tl.minimum(tl.maximum(ratio, lo), hi)
    pg = tl.maximum(pg1, pg2)
    high = pg1 < pg2
    g1 = tl.where((lr >= -20.0) & (lr <= 20.0), na * ratio, 0.0)
    g2 = tl.where((ratio >= lo) & (ratio <= hi), g1, 0.0)
    g = tl.where(pg1 > pg2, g1, tl.where(pg1 < pg2, g2, 0.5 * g1 + 0.5 * g2))
    low = tl.zeros_like(high)
    if HAS_DUAL:
        neg = a < 0.0
        pg3 = na * dual
        low = neg & (pg > pg3)
        g = tl.where(neg & (pg == pg3), 0.5 * g, g)
        g = tl.where(low, 0.0, g)
        pg = tl.where(neg, tl.minimum(pg, pg3), pg)
    return pg, high, low, g


@triton.jit
def _kl_terms(lp, ref, KL_TYPE: tl.constexpr):
    """-> (kl, d kl / d logp) for kl_type low_var_kl (0), kl (1), abs (2), mse (3)."""
    if KL_TYPE == 0:
        draw = ref - lp
        d = tl.minimum(tl.maximum(draw, -20.0), 20.0)
        e = tl.exp(d)
        k = e - d - 1.0
        ok = (draw >= -20.0) & (draw <= 20.0) & (k >= -10.0) & (k <= 10.0)
        return tl.minimum(tl.maximum(k, -10.0), 10.0), tl.where(ok, 1.0 - e, 0.0)
    elif KL_TYPE == 1:
        return lp - ref, tl.full(lp.shape, 1.0, tl.float32)
    elif KL_TYPE == 2:
        diff = lp - ref
        return tl.abs(diff), tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
    else:
        diff = lp - ref
        return 0.5 * (diff * diff), diff


@triton.jit
def _load_tokens(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, b, row, offs, ok,
    HAS_OLD: tl.constexpr, ADV_PER_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One block of row b's tokens as fp32 -> (logp, mask, old_logp (logp when absent), advantages)."""
    lp = tl.load(logp_ptr + row + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + row + offs, mask=ok, other=0).to(tl.float32)
    if HAS_OLD:
        old = tl.load(old_ptr + row + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        old = lp
    if ADV_PER_TOKEN:
        a = tl.load(adv_ptr + row + offs, mask=ok, other=0.0)
    else:
        a = tl.load(adv_ptr + b) + tl.zeros((BLOCK_T,), tl.float32)
    return lp, m, old, a


@triton.jit
def _grpo_loss_fwd_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, part_ptr, B, T, lo, hi, dual,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr, ADV_PER_TOKEN: tl.constexpr,
    KL_TYPE: tl.constexpr, BLOCK_T: tl.constexpr, N_ITERS: tl.constexpr,
):
    b = tl.program_id(0)
    row = b.to(tl.int64) * T
    # the six running sums, in part_ptr's row order, all from one zero block (Triton values are
    # immutable: `+=` makes a new one, so the names never alias)
    zero = tl.zeros((BLOCK_T,), tl.float32)
    s_pg, s_kl, s_m, s_hi, s_lo, s_ppo = zero, zero, zero, zero, zero, zero
    for it in range(N_ITERS):
        offs = it * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = offs < T
        lp, m, old, a = _load_tokens(logp_ptr, old_ptr, adv_ptr, mask_ptr, b, row, offs, ok, HAS_OLD, ADV_PER_TOKEN, BLOCK_T)
        pg, high, low, _ = _pg_terms(lp, old, a, lo, hi, dual, HAS_DUAL)
        on = m != 0.0  # a masked-out token adds exactly 0, even where its terms are NaN/inf (where, not 0 * x)
        s_pg += tl.where(on, pg * m, 0.0)
        s_m += m
        s_hi += tl.where(high, m, 0.0)
        s_lo += tl.where(low, m, 0.0)
        if HAS_OLD:
            s_ppo += tl.where(on, (old - lp) * m, 0.0)
        if HAS_REF:
            ref = tl.load(ref_ptr + row + offs, mask=ok, other=0.0).to(tl.float32)
            kl, _ = _kl_terms(lp, ref, KL_TYPE)
            s_kl += tl.where(on, kl * m, 0.0)
    tl.store(part_ptr + 0 * B + b, tl.sum(s_pg, axis=0))
    tl.store(part_ptr + 1 * B + b, tl.sum(s_kl, axis=0))
    tl.store(part_ptr + 2 * B + b, tl.sum(s_m, axis=0))
    tl.store(part_ptr + 3 * B + b, tl.sum(s_hi, axis=0))
    tl.store(part_ptr + 4 * B + b, tl.sum(s_lo, axis=0))
    tl.store(part_ptr + 5 * B + b, tl.sum(s_ppo, axis=0))


@triton.jit
def _grpo_loss_finalize_kernel(
    part_ptr, loss_ptr, metrics_ptr, row_w_ptr, B, T, kl_coef, AGG: tl.constexpr, BLOCK_B: tl.constexpr,
    N_B_ITERS: tl.constexpr,
):
    offs0 = tl.arange(0, BLOCK_B)
    Bf = B * 1.0  # B (and T) may arrive as constexpr 1: no .to()
    # the six row sums' totals and the seq-mean loss, all from one zero block (as in the forward)
    zero = tl.zeros((BLOCK_B,), tl.float32)
    a_pg, a_kl, a_m, a_hi, a_lo, a_ppo, a_seq = zero, zero, zero, zero, zero, zero, zero
    for it in range(N_B_ITERS):
        offs = it * BLOCK_B + offs0
        ok = offs < B
        pg = tl.load(part_ptr + 0 * B + offs, mask=ok, other=0.0)
        kl = tl.load(part_ptr + 1 * B + offs, mask=ok, other=0.0)
        n = tl.load(part_ptr + 2 * B + offs, mask=ok, other=0.0)
        a_pg += pg
        a_kl += kl
        a_m += n
        a_hi += tl.load(part_ptr + 3 * B + offs, mask=ok, other=0.0)
        a_lo += tl.load(part_ptr + 4 * B + offs, mask=ok, other=0.0)
        a_ppo += tl.load(part_ptr + 5 * B + offs, mask=ok, other=0.0)
        if AGG != 0:
            if AGG == 1:  # seq-mean-token-mean: an empty row gives 0 and still counts in B
                w = tl.where(n > 0.0, 1.0 / (tl.where(n > 0.0, n, 1.0) * Bf), 0.0)
            elif AGG == 2:  # seq-mean-token-sum
                w = tl.zeros((BLOCK_B,), tl.float32) + 1.0 / Bf
            else:  # seq-mean-token-sum-norm (T > 0 whenever a row exists here)
                w = tl.zeros((BLOCK_B,), tl.float32) + 1.0 / (Bf * (T * 1.0))
            tl.store(row_w_ptr + offs, w, mask=ok)
            a_seq += tl.where(ok, w * (pg + kl_coef * kl), 0.0)
    n_tot = tl.sum(a_m, axis=0)
    inv = tl.where(n_tot > 0.0, 1.0 / tl.where(n_tot > 0.0, n_tot, 1.0), 0.0)
    kl_tot = tl.sum(a_kl, axis=0)
    if AGG == 0:
        loss = tl.sum(a_pg, axis=0) * inv + kl_coef * (kl_tot * inv)
        for it in range(N_B_ITERS):
            offs = it * BLOCK_B + offs0
            tl.store(row_w_ptr + offs, tl.zeros((BLOCK_B,), tl.float32) + inv, mask=offs < B)
    else:
        loss = tl.sum(a_seq, axis=0)
    tl.store(loss_ptr, loss)
    tl.store(metrics_ptr + 0, tl.sum(a_hi, axis=0) * inv)
    tl.store(metrics_ptr + 1, tl.sum(a_lo, axis=0) * inv)
    tl.store(metrics_ptr + 2, tl.sum(a_ppo, axis=0) * inv)
    tl.store(metrics_ptr + 3, kl_tot * inv)


@triton.jit
def _grpo_loss_bwd_kernel(
    grad_ptr, logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row_w_ptr, dlogp_ptr, T, lo, hi, dual, kl_coef,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr, ADV_PER_TOKEN: tl.constexpr,
    KL_TYPE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = offs < T
    row = b.to(tl.int64) * T
    lp, m, old, a = _load_tokens(logp_ptr, old_ptr, adv_ptr, mask_ptr, b, row, offs, ok, HAS_OLD, ADV_PER_TOKEN, BLOCK_T)
    _, _, _, g = _pg_terms(lp, old, a, lo, hi, dual, HAS_DUAL)
    if HAS_REF:
        ref = tl.load(ref_ptr + row + offs, mask=ok, other=0.0).to(tl.float32)
        _, dkl = _kl_terms(lp, ref, KL_TYPE)
        g = g + kl_coef * dkl
    c = tl.load(grad_ptr) * tl.load(row_w_ptr + b)
    # a masked-out token gets exactly 0, even where its terms are NaN/inf (where, not 0 * x)
    tl.store(dlogp_ptr + row + offs, tl.where(m != 0.0, (c * m) * g, 0.0).to(dlogp_ptr.dtype.element_ty), mask=ok)


def _block_t(T: int) -> int:
    # the interpreter runs one big block much faster than many small ones
    cap = 4096 if _triton.interpreting() else 1024
    return max(16, min(triton.next_power_of_2(max(T, 1)), cap))


def _shared_args(logp, advantages, old_logp, ref_logp, clip_low, clip_high, dual_clip, kl_type):
    """What the forward and backward kernels take alike -> ((old, ref) pointers, logp where absent;
    the clip bounds (lo, hi, dual); the constexpr flags as keywords)."""
    has_old, has_ref = old_logp is not None, ref_logp is not None
    ptrs = (old_logp if has_old else logp, ref_logp if has_ref else logp)
    clips = (1.0 - clip_low, 1.0 + clip_high, 0.0 if dual_clip is None else dual_clip)
    # KL_TYPE specializes the kernels only where there is a reference (the KL terms exist only then):
    # without one, every kl_type is the same compiled kernel
    kl_code = KL_TYPES[kl_type]
    flags = dict(HAS_OLD=has_old, HAS_REF=has_ref, HAS_DUAL=dual_clip is not None,
                 ADV_PER_TOKEN=advantages.dim() == 2, KL_TYPE=kl_code if has_ref else 0)
    return ptrs, clips, flags


def grpo_loss_fwd(
    *, logp, advantages, mask, old_logp=None, ref_logp=None, clip_low=0.2, clip_high=0.3, dual_clip=3.0,
    kl_coef=0.0, kl_type="low_var_kl", loss_agg="token-mean",
):
    """logp/old/ref: [B, T] contiguous, one dtype; advantages: fp32 [B] or [B, T]; mask: bool/fp32 [B, T]
    -> (loss [] fp32, metrics [4] fp32, row_weight [B] fp32)."""
    B, T = logp.shape
    f32 = dict(device=logp.device, dtype=torch.float32)
    part = torch.zeros((6, B), **f32)
    loss, metrics, row_w = torch.empty((), **f32), torch.empty((4,), **f32), torch.empty((B,), **f32)
    (old, ref), clips, flags = _shared_args(logp, advantages, old_logp, ref_logp, clip_low, clip_high, dual_clip, kl_type)
    block = _block_t(T)
    if B > 0:
        _grpo_loss_fwd_kernel[(B,)](
            logp, old, ref, advantages, mask, part, B, T, *clips, **flags, BLOCK_T=block,
            N_ITERS=triton.cdiv(T, block), num_warps=4,
        )
    block_b = max(16, min(triton.next_power_of_2(max(B, 1)), 1024))
    _grpo_loss_finalize_kernel[(1,)](
        part, loss, metrics, row_w, B, T, kl_coef if flags["HAS_REF"] else 0.0, AGG=LOSS_AGGS[loss_agg],
        BLOCK_B=block_b, N_B_ITERS=triton.cdiv(B, block_b), num_warps=4,
    )
    return loss, metrics, row_w


def grpo_loss_bwd(
    *, grad_loss, logp, advantages, mask, old_logp=None, ref_logp=None, row_weight, clip_low=0.2, clip_high=0.3,
    dual_clip=3.0, kl_coef=0.0, kl_type="low_var_kl",
):
    """-> dlogp [B, T] in logp's dtype."""
    B, T = logp.shape
    dlogp = torch.empty_like(logp)
    if B * T == 0:
        return dlogp
    (old, ref), clips, flags = _shared_args(logp, advantages, old_logp, ref_logp, clip_low, clip_high, dual_clip, kl_type)
    block = _block_t(T)
    _grpo_loss_bwd_kernel[(B, triton.cdiv(T, block))](
        grad_loss, logp, old, ref, advantages, mask, row_weight, dlogp, T, *clips,
        kl_coef if flags["HAS_REF"] else 0.0, **flags, BLOCK_T=block, num_warps=4,
    )
    return dlogp
