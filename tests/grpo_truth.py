"""The fp64 truth of engine.ops.grpo_loss (the formulas of docs/ops.md#grpo_loss written out in
float64, never engine.reference), the inputs the grpo_loss tests draw, and their error bounds:
shared by tests/test_grpo_loss.py, test_grpo_loss_cpu_paths.py and test_grpo_loss_extremes.py."""
import itertools
import os
import subprocess
import sys

import pytest
import torch

import engine
import engine.ops as ops
from engine.grpo_options import KL_TYPES, LOSS_AGGS
from tests.tolerance import assert_matches_fp64

DEVICE_IS_CUDA = os.environ.get("ENGINE_TEST_DEVICE", "cpu") == "cuda"
METRICS = ("clipfrac_high", "clipfrac_low", "ppo_kl", "kl")
FLAGS = list(itertools.product((3.0, None), (True, False), (True, False), (False, True)))  # dual, old, ref, adv/token

# Bounds (tests/tolerance.py: k * eps(dtype) * scale), and why:
# - loss and metrics are accumulated and returned in fp32. Per token: exp and a few products, about
#   4 roundings. Summed: the longest chains of sequential fp32 adds are the C++ kernel's 2048-token
#   chunks over 16 lanes (128 adds per lane; then double) and the CUDA kernel's 256-thread strides;
#   such chains err about sqrt(n) eps at random, <= 12 eps here (measured on CPU, every backend and
#   the reference: <= 1.4 eps). k = 16. The scale is the same aggregate taken over |terms| (at least
#   1): rounding is relative to the terms summed, not to a total that may cancel to ~0.
# - dlogp is one elementwise expression per token, computed in fp32 (about 6 roundings: exp, the
#   products with A, the row weight, the mask and upstream, the KL term) and stored in logp's dtype.
#   fp32: k = 8 (measured <= 2.3). bf16/fp16: one final rounding, at most half an ulp of the entry,
#   dwarfs the fp32 part: k = 1 (measured <= 0.46). The scale is the larger of max |dlogp| (what the
#   final rounding is relative to) and max over tokens of the |terms| that entry sums (what the fp32
#   part is relative to): a clipped token's gradient is the KL part alone, kl_coef * (1 - exp(ref - logp)),
#   which cancels to ~1e-11 when ref ~ logp, and 8 eps of that tiny entry failed the reference and
#   every kernel alike on 40 of 3,000 random 1x1 draws. Entries are about 1/(number of tokens), so the
#   tolerance's default floor of 1 would accept any gradient: neither scale has that floor.
K_SUM = 16
K_GRAD = {torch.float32: 8, torch.bfloat16: 1, torch.float16: 1}


def _fp64(logp, adv, mask, *, old_logp=None, ref_logp=None, clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.0,
          kl_type="low_var_kl", loss_agg="token-mean"):
    """The contract's formulas in fp64, written independently of engine.reference ->
    (loss, metrics, scales): scales[name] is that output's aggregate over |terms| (the magnitude its
    rounding error is relative to); scales["dlogp"] is the largest per-token sum of |terms| of
    d loss / d logp (for an upstream gradient of 1)."""
    lp = logp.double()
    old = lp.detach() if old_logp is None else old_logp.double()
    a = adv.double() if adv.dim() == 2 else adv.double()[:, None].expand_as(lp)
    m = mask.double()
    ratio = torch.exp(torch.clamp(lp - old, -20, 20))
    pg1, pg2 = -a * ratio, -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    hi = (pg1 < pg2).double()
    lo = torch.zeros_like(lp)
    if dual_clip is not None:
        pg3 = -a * dual_clip
        lo = ((a < 0) & (pg.detach() > pg3)).double()
        pg = torch.where(a < 0, torch.minimum(pg, pg3), pg)

    def agg(v):
        B, T = v.shape
        if loss_agg == "token-mean":
            n = m.sum()
            return (v * m).sum() / n if n > 0 else (v * m).sum() * 0
        rows = (v * m).sum(-1)
        if loss_agg == "seq-mean-token-mean":
            n = m.sum(-1)
            rows = torch.where(n > 0, rows / torch.where(n > 0, n, 1.0), rows * 0)
        elif loss_agg == "seq-mean-token-sum-norm":
            rows = rows / T
        return rows.sum() / max(B, 1)

    loss = agg(pg)
    loss_mag = agg(pg.detach().abs())
    # d agg(v) / d v: the weight each token's term gets (agg is linear in v)
    probe = torch.zeros_like(lp, requires_grad=True)
    (token_weight,) = torch.autograd.grad(agg(probe), probe) if lp.numel() else (torch.zeros_like(lp),)
    grad_terms = a.abs() * ratio.detach()  # the policy term's magnitude, clipped or not (an upper bound)
    kl = torch.zeros_like(lp)
    if ref_logp is not None:
        ref = ref_logp.double()
        if kl_type == "low_var_kl":
            d = torch.clamp(ref - lp, -20, 20)
            kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)
            kl_terms = torch.exp(d.detach()) + 1  # d/dlogp = 1 - exp(d)
        elif kl_type == "kl":
            kl = lp - ref
            kl_terms = torch.ones_like(lp)
        elif kl_type == "abs":
            kl = (lp - ref).abs()
            kl_terms = torch.ones_like(lp)
        else:
            kl = 0.5 * (lp - ref) ** 2
            kl_terms = lp.detach().abs() + ref.abs()  # d/dlogp = logp - ref
        loss = loss + kl_coef * agg(kl)
        loss_mag = loss_mag + abs(kl_coef) * agg(kl.detach().abs())
        grad_terms = grad_terms + abs(kl_coef) * kl_terms
    n = m.sum()

    def tmean(v):
        return (v.detach() * m).sum() / n if n > 0 else torch.zeros((), dtype=torch.float64, device=lp.device)

    ppo = (old - lp) if old_logp is not None else torch.zeros_like(lp)
    metrics = {"clipfrac_high": tmean(hi), "clipfrac_low": tmean(lo), "ppo_kl": tmean(ppo), "kl": tmean(kl)}
    scales = {name: max(1.0, float(tmean(v.abs()))) for name, v in zip(METRICS, (hi, lo, ppo, kl))}
    # The clip fractions count tokens whose ratio is past a threshold. A kernel computes the ratio in
    # fp32 (a subtraction and an exp: a few roundings), so a token whose fp64 ratio lies within
    # K_SUM fp32 ulps of its threshold may fall on either side, in the kernel and in the fp32
    # reference alike (CI failed once on clipfrac_low: one such token of ~8,000, 1.6e-4). That
    # token mass is added to the bound (k * eps * scale); it is 0 on almost every draw.
    eps32 = torch.finfo(torch.float32).eps

    def near(threshold):
        return (ratio.detach() - threshold).abs() <= K_SUM * eps32 * threshold

    tie_hi = ((a > 0) & near(1 - clip_low)) | ((a < 0) & near(1 + clip_high))
    tie_lo = (a < 0) & near(dual_clip) if dual_clip is not None else torch.zeros_like(tie_hi)
    for name, tie in (("clipfrac_high", tie_hi), ("clipfrac_low", tie_lo)):
        scales[name] += float(tmean(tie.double())) / (K_SUM * eps32)
    scales["loss"] = max(1.0, float(loss_mag))
    scales["dlogp"] = float((token_weight.abs() * grad_terms).max()) if lp.numel() else 0.0
    return loss, metrics, scales


def _inputs(B, T, dtype, *, adv_per_token, has_old, has_ref, mask_kind="bool", device="cpu"):
    logp = (torch.randn(B, T) * 0.5 - 2).to(dtype)
    old = (logp.float() + 0.3 * torch.randn(B, T)).to(dtype) if has_old else None
    ref = (logp.float() + 0.6 * torch.randn(B, T)).to(dtype) if has_ref else None
    adv = torch.randn(B, T) if adv_per_token else torch.randn(B)
    if mask_kind == "bool":
        mask = torch.rand(B, T) > 0.25
    else:
        mask = (torch.rand(B, T) > 0.25).float() * torch.rand(B, T)  # float weights
    if B > 2:
        mask[1] = False if mask.dtype == torch.bool else 0.0  # an empty row
    return tuple(None if t is None else t.to(device) for t in (logp, adv, mask, old, ref))


def _run(backend, logp, adv, mask, upstream, **kw):
    """-> (loss, metrics, dlogp) of `backend` for loss * upstream."""
    x = logp.detach().clone().requires_grad_()
    with engine.backend(backend):
        loss, metrics = ops.grpo_loss(x, adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss * upstream, x)
    return loss, metrics, grad


def _check_all(backend, logp, adv, mask, old, ref, **kw):
    kw = dict(kw, old_logp=old, ref_logp=ref)
    upstream = torch.randn((), device=logp.device)
    loss, metrics, grad = _run(backend, logp, adv, mask, upstream, **kw)
    t_loss, t_metrics, t_grad = _run("torch", logp, adv, mask, upstream, **kw)
    x64 = logp.detach().double().requires_grad_()
    l64, m64, scales = _fp64(x64, adv, mask, **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
    (g64,) = torch.autograd.grad(l64 * upstream.double(), x64)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == logp.dtype
    assert_matches_fp64("loss", loss, l64, dtype=torch.float32, k=K_SUM, scale=scales["loss"], torch_out=t_loss)
    for name in METRICS:
        assert metrics[name].dtype == torch.float32 and metrics[name].shape == () and not metrics[name].requires_grad
        assert_matches_fp64(name, metrics[name], m64[name], dtype=torch.float32, k=K_SUM, scale=scales[name],
                            torch_out=t_metrics[name])
    g_scale = max(float(g64.abs().max()), scales["dlogp"] * abs(float(upstream))) if g64.numel() else 0.0
    # fp16 entries ~1e-5 are subnormal: their spacing is fixed (2**-24), not relative to the entry
    g_scale = max(g_scale, torch.finfo(grad.dtype).smallest_normal)
    assert_matches_fp64("dlogp", grad, g64, dtype=grad.dtype, k=K_GRAD[grad.dtype], scale=g_scale, torch_out=t_grad)


def _outputs(backend, logp, adv, mask, old, ref):
    loss, metrics, grad = _run(backend, logp, adv, mask, torch.tensor(1.3, device=logp.device), old_logp=old, ref_logp=ref,
                               kl_coef=0.01)
    return [loss, grad] + [metrics[k] for k in METRICS]


def _assert_bitwise(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y) and x.dtype == y.dtype
