"""engine.ops.grpo_loss: every backend and the reference against an fp64 evaluation of the formulas.

The fp64 truth is this file's own code (the contract, docs/ops.md#grpo_loss), never
`engine.reference`; `assert_matches_fp64` bounds the backend's error and the reference's alike, so a
wrong reference fails as surely as a wrong kernel. Every option combination (kl_type x loss_agg x dual clip on/off x old_logp/ref_logp given or not x
advantages per sequence/per token), forward and backward with a random upstream gradient; edge
cases (empty masks, B = 0, T = 1, extreme log-ratios); bad input; opcheck; torch.compile;
bitwise determinism (repeated calls, 1 vs 2 threads); every CPU path of the C++ kernel (scalar, default,
AVX2, AVX-512 builds) against fp64 and against each other.
"""
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
#   dwarfs the fp32 part: k = 1 (measured <= 0.46). The scale is max |dlogp| itself: entries are
#   about 1/(number of tokens), so the tolerance's default floor of 1 would accept any gradient.
K_SUM = 16
K_GRAD = {torch.float32: 8, torch.bfloat16: 1, torch.float16: 1}


def _fp64(logp, adv, mask, *, old_logp=None, ref_logp=None, clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.0,
          kl_type="low_var_kl", loss_agg="token-mean"):
    """The contract's formulas in fp64, written independently of engine.reference ->
    (loss, metrics, scales): scales[name] is that output's aggregate over |terms| (the magnitude its
    rounding error is relative to)."""
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
    kl = torch.zeros_like(lp)
    if ref_logp is not None:
        ref = ref_logp.double()
        if kl_type == "low_var_kl":
            d = torch.clamp(ref - lp, -20, 20)
            kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)
        elif kl_type == "kl":
            kl = lp - ref
        elif kl_type == "abs":
            kl = (lp - ref).abs()
        else:
            kl = 0.5 * (lp - ref) ** 2
        loss = loss + kl_coef * agg(kl)
        loss_mag = loss_mag + abs(kl_coef) * agg(kl.detach().abs())
    n = m.sum()

    def tmean(v):
        return (v.detach() * m).sum() / n if n > 0 else torch.zeros((), dtype=torch.float64, device=lp.device)

    ppo = (old - lp) if old_logp is not None else torch.zeros_like(lp)
    metrics = {"clipfrac_high": tmean(hi), "clipfrac_low": tmean(lo), "ppo_kl": tmean(ppo), "kl": tmean(kl)}
    scales = {name: max(1.0, float(tmean(v.abs()))) for name, v in zip(METRICS, (hi, lo, ppo, kl))}
    scales["loss"] = max(1.0, float(loss_mag))
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
    g_scale = float(g64.abs().max()) if g64.numel() else 0.0
    assert_matches_fp64("dlogp", grad, g64, dtype=grad.dtype, k=K_GRAD[grad.dtype], scale=g_scale, torch_out=t_grad)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("dual_clip,has_old,has_ref,adv_per_token", FLAGS, ids=lambda v: str(v))
def test_every_option_matches_fp64(backend_name, device, loss_agg, kl_type, dual_clip, has_old, has_ref, adv_per_token):
    logp, adv, mask, old, ref = _inputs(5, 37, torch.float32, adv_per_token=adv_per_token, has_old=has_old, has_ref=has_ref,
                                        mask_kind="bool" if adv_per_token else "float", device=device)
    _check_all(backend_name, logp, adv, mask, old, ref, clip_low=0.2, clip_high=0.3, dual_clip=dual_clip, kl_coef=0.1,
               kl_type=kl_type, loss_agg=loss_agg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_half_dtypes(backend_name, device, dtype, loss_agg):
    if backend_name == "triton" and device.type == "cpu":
        pytest.skip("the interpreter runs fp32 only")
    logp, adv, mask, old, ref = _inputs(7, 129, dtype, adv_per_token=False, has_old=True, has_ref=True, device=device)
    _check_all(backend_name, logp, adv, mask, old, ref, kl_coef=0.05, loss_agg=loss_agg)


@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 4100), (4, 17)])
def test_odd_shapes(backend_name, device, B, T):
    logp, adv, mask, old, ref = _inputs(B, T, torch.float32, adv_per_token=False, has_old=True, has_ref=True, device=device)
    _check_all(backend_name, logp, adv, mask, old, ref, kl_coef=0.01, loss_agg="seq-mean-token-mean")


def test_mixed_dtypes_and_mask_kinds(backend_name, device):
    logp, adv, _, old, ref = _inputs(4, 33, torch.float32, adv_per_token=False, has_old=True, has_ref=True, device=device)
    mask = torch.rand(4, 33, device=device) > 0.3
    for m in (mask, mask.long(), mask.to(torch.float64)):
        _check_all(backend_name, logp, adv.double(), m, old.to(torch.bfloat16), ref, kl_coef=0.1)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_empty_masks_give_zero(backend_name, device, loss_agg):
    logp, adv, mask, old, ref = _inputs(4, 9, torch.float32, adv_per_token=False, has_old=True, has_ref=True, device=device)
    one = torch.tensor(1.0, device=device)
    loss, metrics, grad = _run(backend_name, logp, adv, torch.zeros(4, 9, dtype=torch.bool, device=device), one,
                               old_logp=old, ref_logp=ref, kl_coef=0.1, loss_agg=loss_agg)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert all(v.item() == 0.0 for v in metrics.values())
    assert torch.equal(grad, torch.zeros_like(grad))
    # one empty row: it contributes 0 (and gets zero gradient), the others are unchanged
    mask = torch.rand(4, 9, device=device) > 0.2
    mask[2] = False
    _, _, grad = _run(backend_name, logp, adv, mask, one, old_logp=old, ref_logp=ref, kl_coef=0.1, loss_agg=loss_agg)
    assert torch.isfinite(grad).all() and torch.equal(grad[2], torch.zeros(9, device=device))


def test_empty_batch(backend_name, device):
    for T in (0, 5):
        logp = torch.zeros(0, T, requires_grad=True, device=device)
        empty = torch.zeros(0, T, device=device)
        with engine.backend(backend_name):
            loss, metrics = ops.grpo_loss(logp, torch.zeros(0, device=device), empty.bool(), old_logp=empty, ref_logp=empty,
                                          kl_coef=0.1)
        loss.backward()
        assert loss.item() == 0.0 and all(v.item() == 0.0 for v in metrics.values())
        assert logp.grad.shape == (0, T)


@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_extreme_log_ratios_stay_finite(backend_name, device, kl_type):
    B, T = 3, 16
    logp = torch.randn(B, T) - 2
    old = logp + torch.tensor([-60.0, 60.0, 0.5]).repeat_interleave(T // 3 + 1)[:T]  # |log-ratio| far past 20
    ref = logp - torch.tensor([50.0, -50.0, 1.0]).repeat_interleave(T // 3 + 1)[:T]
    adv = torch.tensor([1.5, -2.0, 0.7])
    mask = torch.ones(B, T, dtype=torch.bool)
    logp, old, ref, adv, mask = (t.to(device) for t in (logp, old, ref, adv, mask))
    kw = dict(old_logp=old, ref_logp=ref, kl_coef=0.1, kl_type=kl_type)
    loss, metrics, grad = _run(backend_name, logp, adv, mask, torch.tensor(1.0, device=device), **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and all(torch.isfinite(v) for v in metrics.values())
    _check_all(backend_name, logp, adv, mask, old, ref, kl_coef=0.1, kl_type=kl_type)


def test_gradient_only_into_logp(backend_name, device):
    logp, adv, mask, old, ref = _inputs(3, 8, torch.float32, adv_per_token=False, has_old=True, has_ref=True, device=device)
    leaves = [t.clone().requires_grad_() for t in (logp, adv, old, ref)]
    with engine.backend(backend_name):
        loss, _ = ops.grpo_loss(leaves[0], leaves[1], mask, old_logp=leaves[2], ref_logp=leaves[3], kl_coef=0.1)
    loss.backward()
    assert leaves[0].grad is not None
    assert all(t.grad is None for t in leaves[1:])  # old_logp, ref_logp, advantages are constants


# ---------------------------------------------------------------- bad input

BAD = [
    ("logp", dict(logp=torch.randn(4)), "logp"),
    ("logp dtype", dict(logp=torch.zeros(2, 3, dtype=torch.long)), "logp"),
    ("adv shape", dict(advantages=torch.randn(3)), "advantages"),
    ("adv dtype", dict(advantages=torch.zeros(2, dtype=torch.long)), "advantages"),
    ("mask shape", dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
    ("mask dtype", dict(mask=torch.ones(2, 3, dtype=torch.complex64)), "mask"),
    ("old shape", dict(old_logp=torch.randn(3, 3)), "old_logp"),
    ("old dtype", dict(old_logp=torch.zeros(2, 3, dtype=torch.int32)), "old_logp"),
    ("ref shape", dict(ref_logp=torch.randn(2, 4)), "ref_logp"),
    ("kl_type", dict(kl_type="full"), "kl_type"),
    ("loss_agg", dict(loss_agg="seq-mean"), "loss_agg"),
    ("clip_low", dict(clip_low=1.5), "clip_low"),
    ("clip_high", dict(clip_high=-0.1), "clip_high"),
    ("dual_clip", dict(dual_clip=0.5), "dual_clip"),
    ("kl_coef", dict(kl_coef=float("nan")), "kl_coef"),
    ("device", dict(mask=torch.ones(2, 3, dtype=torch.bool, device="meta")), "mask"),
    ("device ref", dict(ref_logp=torch.randn(2, 3, device="meta")), "ref_logp"),
]


@pytest.mark.parametrize("case,override,name", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(backend_name, device, case, override, name):
    args = dict(logp=torch.randn(2, 3), advantages=torch.randn(2), mask=torch.ones(2, 3, dtype=torch.bool))
    args.update(override)
    args = {k: v.to(device) if torch.is_tensor(v) and v.device.type != "meta" else v for k, v in args.items()}
    kw = {k: args.pop(k) for k in list(args) if k not in ("logp", "advantages", "mask")}
    with engine.backend(backend_name), pytest.raises(ValueError, match=name):
        ops.grpo_loss(args["logp"], args["advantages"], args["mask"], **kw)


def test_kernel_checks_raise_value_error():
    if "cpp" not in engine.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    logp, adv, mask = torch.randn(2, 3), torch.randn(2), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="kl_type"):
        torch.ops.engine.grpo_loss_fwd(logp, adv, mask, None, None, 0.2, 0.3, 3.0, 0.0, "nope", "token-mean")
    with pytest.raises(ValueError, match="mask"):
        torch.ops.engine.grpo_loss_fwd(logp, adv, mask[:, :2], None, None, 0.2, 0.3, 3.0, 0.0, "kl", "token-mean")
    with pytest.raises(ValueError, match="row_weight"):
        torch.ops.engine.grpo_loss_bwd(torch.ones(()), logp, adv, mask, None, None, torch.ones(5), 0.2, 0.3, 3.0, 0.0, "kl")


# ---------------------------------------------------------------- torch.library, compile, determinism


@pytest.mark.parametrize("per_token", [False, True])
def test_opcheck(backend_name, device, per_token):
    if backend_name == "torch":
        pytest.skip("the torch backend is plain autograd, not a custom op")
    from engine.grpo_loss import _grpo_loss_backward_op, _grpo_loss_op

    logp, adv, mask, old, ref = _inputs(3, 20, torch.float32, adv_per_token=per_token, has_old=True, has_ref=True,
                                        device=device)
    args = (logp.requires_grad_(), adv, mask, old, ref, 0.2, 0.3, 3.0, 0.1, "low_var_kl", "seq-mean-token-mean", backend_name)
    torch.library.opcheck(_grpo_loss_op, args)
    torch.library.opcheck(_grpo_loss_op, (logp, adv, mask.float(), None, None, 0.2, 0.3, None, 0.0, "kl", "token-mean",
                                          backend_name))
    row_w = _grpo_loss_op(*args)[2].detach()
    torch.library.opcheck(_grpo_loss_backward_op, (torch.tensor(0.7, device=device), logp.detach(), adv, mask, old, ref, row_w, 0.2, 0.3,
                                                   3.0, 0.1, "mse", backend_name))


def test_torch_compile_fullgraph(backend_name, device):
    logp, adv, mask, old, ref = _inputs(4, 24, torch.float32, adv_per_token=False, has_old=True, has_ref=True, device=device)

    def step(x):
        loss, metrics = ops.grpo_loss(x, adv, mask, old_logp=old, ref_logp=ref, kl_coef=0.1, loss_agg="seq-mean-token-sum")
        return loss * 2 + metrics["kl"]

    with engine.backend(backend_name):
        x1 = logp.clone().requires_grad_()
        eager = step(x1)
        eager.backward()
        torch._dynamo.reset()
        x2 = logp.clone().requires_grad_()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x2)
        compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


def _outputs(backend, logp, adv, mask, old, ref):
    loss, metrics, grad = _run(backend, logp, adv, mask, torch.tensor(1.3, device=logp.device), old_logp=old, ref_logp=ref,
                               kl_coef=0.01)
    return [loss, grad] + [metrics[k] for k in METRICS]


def _assert_bitwise(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y) and x.dtype == y.dtype


def test_deterministic_repeated_and_across_threads(backend_name, device):
    if backend_name == "torch":
        pytest.skip("determinism is a property of the kernels")
    B, T = (3, 300) if backend_name == "triton" and device.type == "cpu" else (8, 2500)
    logp, adv, mask, old, ref = _inputs(B, T, torch.float32, adv_per_token=False, has_old=True, has_ref=True, device=device)
    first = _outputs(backend_name, logp, adv, mask, old, ref)
    for _ in range(4):
        _assert_bitwise(first, _outputs(backend_name, logp, adv, mask, old, ref))
    if backend_name == "cpp":
        threads = torch.get_num_threads()
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                _assert_bitwise(first, _outputs(backend_name, logp, adv, mask, old, ref))
        finally:
            torch.set_num_threads(threads)


# ---------------------------------------------------------------- the C++ kernel's CPU paths
# csrc/cpu/grpo_loss.cpp runs one of: "avx512" / "avx2" (Vectorized<float> builds for those ISAs),
# "default" (the same kernel at default flags: NEON on aarch64, plain C++ lanes elsewhere) and
# "scalar" (grpo_math.h's per-token functions, the code the CUDA kernel runs). ENGINE_GRPO_CPU picks
# one per call, never above what the CPU runs; torch.ops.engine.grpo_loss_cpu_path() names it.
CPU_PATHS = ("scalar", "default", "avx2", "avx512")


def _cpu_paths_here(monkeypatch):
    """The paths this machine runs (each one that ENGINE_GRPO_CPU can select)."""
    if DEVICE_IS_CUDA or "cpp" not in engine.available_backends("cpu"):
        pytest.skip("needs the cpp backend on CPU tensors")
    here = []
    for path in CPU_PATHS:
        monkeypatch.setenv("ENGINE_GRPO_CPU", path)
        if torch.ops.engine.grpo_loss_cpu_path() == path:
            here.append(path)
    monkeypatch.delenv("ENGINE_GRPO_CPU")
    assert here[:2] == ["scalar", "default"]  # on every CPU
    return here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_cpu_paths_match_fp64_and_each_other(monkeypatch, kl_type, dtype):
    """Every CPU path of the C++ kernel against fp64 (as every backend is), and the vector builds
    against the scalar path: fp32 sums and gradients to a few ulp, bf16/fp16 gradients to one ulp
    of their dtype. T = 2100: two chunks, several blocks and a tail shorter than any vector."""
    paths = _cpu_paths_here(monkeypatch)
    flags = [(3.0, False, "bool", "seq-mean-token-mean"), (None, True, "float", "token-mean"),
             (1.5, True, "bool", "seq-mean-token-sum-norm")]
    for dual_clip, per_token, mask_kind, loss_agg in flags:
        if dtype == torch.float16:
            # gradients of ~1/(tokens) would be fp16 subnormals, whose half-ulp rounding alone exceeds
            # the bound eps(fp16) * max|dlogp|: weight rows by 1/B only
            loss_agg = "seq-mean-token-sum"
        logp, adv, mask, old, ref = _inputs(5, 2100, dtype, adv_per_token=per_token, has_old=True, has_ref=True,
                                            mask_kind=mask_kind)
        old[0, :40] = logp[0, :40]  # ratio exactly 1: ties between pg1 and pg2
        kw = dict(old_logp=old, ref_logp=ref, kl_coef=0.1, kl_type=kl_type, dual_clip=dual_clip, loss_agg=loss_agg)
        upstream = torch.randn(())
        outs = {}
        for path in paths:
            monkeypatch.setenv("ENGINE_GRPO_CPU", path)
            _check_all("cpp", logp, adv, mask, old, ref, **{k: v for k, v in kw.items() if k not in ("old_logp", "ref_logp")})
            loss, metrics, grad = _run("cpp", logp, adv, mask, upstream, **kw)
            outs[path] = [loss, grad] + [metrics[k] for k in METRICS]
        for path in paths[1:]:
            for name, a, b in zip(("loss", "dlogp") + METRICS, outs[path], outs["scalar"]):
                if name == "dlogp":
                    eps = torch.finfo(dtype).eps
                    tol = dict(rtol=eps if dtype != torch.float32 else 4 * eps, atol=4 * 1.2e-7 * float(b.abs().max()))
                else:
                    tol = dict(rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{path} vs scalar, {name}: {m}")


def test_cpu_paths_deterministic_across_threads(monkeypatch):
    """Each CPU path gives bitwise the same results for 1 and 2 threads."""
    paths = _cpu_paths_here(monkeypatch)
    logp, adv, mask, old, ref = _inputs(8, 2500, torch.float32, adv_per_token=False, has_old=True, has_ref=True)
    threads = torch.get_num_threads()
    try:
        for path in paths:
            monkeypatch.setenv("ENGINE_GRPO_CPU", path)
            torch.set_num_threads(1)
            first = _outputs("cpp", logp, adv, mask, old, ref)
            torch.set_num_threads(2)
            _assert_bitwise(first, _outputs("cpp", logp, adv, mask, old, ref))
    finally:
        torch.set_num_threads(threads)


def test_aten_cpu_capability_caps_the_path(monkeypatch):
    """ATEN_CPU_CAPABILITY=default|avx2 caps the path as it caps ATen's kernels (read once per
    process, hence subprocesses); a bad ENGINE_GRPO_CPU is a ValueError."""
    paths = _cpu_paths_here(monkeypatch)
    script = "import torch, engine._C; print(torch.ops.engine.grpo_loss_cpu_path())"
    env = {k: v for k, v in os.environ.items() if k != "ENGINE_GRPO_CPU"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # (an ATEN_CPU_CAPABILITY already set for this process caps `paths` too: then only "at most avx2")
    for cap, want in (("default", {"default"}), ("avx2", {"avx2"} if "avx2" in paths else {"default", "avx2"}),
                      (os.environ.get("ATEN_CPU_CAPABILITY"), {paths[-1]})):
        e = dict(env, ATEN_CPU_CAPABILITY=cap) if cap else env
        out = subprocess.run([sys.executable, "-c", script], env=e, cwd=root, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() in want, (cap, out.stdout)
    monkeypatch.setenv("ENGINE_GRPO_CPU", "sse9")
    with pytest.raises(ValueError, match="ENGINE_GRPO_CPU"):
        torch.ops.engine.grpo_loss_cpu_path()


_COMPILE_SM90 = r"""
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton_kernels.group_advantages as A
    import triton_kernels.grpo_loss as G
except Exception as exc:
    print("SKIP triton cannot compile here:", exc); sys.exit(0)

def compile_(fn, sig, consts):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32))
    except (RuntimeError, FileNotFoundError) as exc:
        if "ptxas" in str(exc):
            print("SKIP no ptxas:", exc); sys.exit(0)
        raise

rows = dict(logp_ptr="*bf16", old_ptr="*bf16", ref_ptr="*bf16", adv_ptr="*fp32", mask_ptr="*i1")
for kl in range(4):
    flags = dict(HAS_OLD=True, HAS_REF=True, HAS_DUAL=kl % 2 == 0, ADV_PER_TOKEN=kl < 2, KL_TYPE=kl)
    compile_(G._grpo_loss_fwd_kernel, dict(rows, part_ptr="*fp32", B="i32", T="i32", lo="fp32", hi="fp32", dual="fp32"),
             dict(flags, BLOCK_T=1024, N_ITERS=2))
    compile_(G._grpo_loss_bwd_kernel, dict(rows, grad_ptr="*fp32", row_w_ptr="*fp32", dlogp_ptr="*bf16", T="i32",
             lo="fp32", hi="fp32", dual="fp32", kl_coef="fp32"), dict(flags, BLOCK_T=1024))
    compile_(G._grpo_loss_finalize_kernel, dict(part_ptr="*fp32", loss_ptr="*fp32", metrics_ptr="*fp32",
             row_w_ptr="*fp32", B="i32", T="i32", kl_coef="fp32"), dict(AGG=kl, BLOCK_B=1024, N_B_ITERS=1))
compile_(A._batch_std_kernel, dict(r_ptr="*fp32", std_ptr="*fp64", par_ptr="*fp64", B="i32"), dict(BLOCK=1024, N_ITERS=2))
for scale in range(3):
    compile_(A._group_advantages_fwd_kernel, dict(r_ptr="*fp32", out_ptr="*fp32", std_ptr="*fp64", par_ptr="*fp64",
             num_groups="i32", G="i32"), dict(SCALE=scale, BLOCK_G=8, GROUPS=64))
print("OK")
"""


@pytest.mark.skipif(DEVICE_IS_CUDA, reason="on a GPU the Triton tests above compile and run the kernels")
def test_triton_kernels_compile_for_sm90():
    """The interpreter runs the Triton kernels but never compiles them: compile every kernel (each
    kl_type and loss_agg, bf16 logp, bool mask) for an H100 (sm_90, ptxas) in a process without
    TRITON_INTERPRET, so that typing errors show up here and not on the GPU machine."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


# ---- extreme values: one semantics for every backend (docs/ops.md#grpo_loss, "Extreme values") ----


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["logp", "old_logp", "ref_logp", "advantages"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_masked_out_tokens_affect_nothing(backend_name, device, bad, where, loss_agg):
    """NaN/inf under mask 0 (in any input) changes no output and no gradient: the masked sums select,
    they do not multiply by the mask (0 * NaN = NaN)."""
    B, T = 3, 37
    logp, adv, mask, old, ref = _inputs(B, T, torch.float32, adv_per_token=True, has_old=True, has_ref=True,
                                        mask_kind="float", device=device)
    mask[0, 5] = 0.0
    mask[2, 30] = 0.0
    kw = dict(kl_coef=0.1, loss_agg=loss_agg)
    upstream = torch.tensor(1.3, device=device)
    clean = _run(backend_name, logp, adv, mask, upstream, old_logp=old, ref_logp=ref, **kw)
    inputs = dict(logp=logp.clone(), advantages=adv.clone(), old_logp=old.clone(), ref_logp=ref.clone())
    for b, t in ((0, 5), (2, 30)):
        inputs[where][b, t] = bad
    dirty = _run(backend_name, inputs["logp"], inputs["advantages"], mask, upstream,
                 old_logp=inputs["old_logp"], ref_logp=inputs["ref_logp"], **kw)
    assert torch.isfinite(dirty[0]) and all(torch.isfinite(v) for v in dirty[1].values())
    torch.testing.assert_close(dirty[0], clean[0])
    for k in METRICS:
        torch.testing.assert_close(dirty[1][k], clean[1][k], msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(dirty[2], clean[2])
    assert dirty[2][0, 5] == 0 and dirty[2][2, 30] == 0


def test_ppo_kl_nan_only_under_mask_zero(backend_name, device):
    """The probe's case: old_logp NaN only where the mask is 0 -> ppo_kl 0 (not NaN), every backend."""
    logp = torch.zeros(1, 2, device=device)
    old = torch.tensor([[0.0, float("nan")]], device=device)
    for mask in (torch.tensor([[1.0, 0.0]], device=device), torch.tensor([[True, False]], device=device)):
        with engine.backend(backend_name):
            loss, metrics = ops.grpo_loss(logp, torch.ones(1, device=device), mask, old_logp=old)
        assert float(metrics["ppo_kl"]) == 0.0 and torch.isfinite(loss)


@pytest.mark.parametrize("value", [float("nan"), -0.5, float("inf"), -1])
def test_bad_mask_values_raise(backend_name, device, value):
    """A non-bool mask holds weights: NaN, inf or negative ones are refused, naming mask."""
    dtype = torch.int64 if isinstance(value, int) else torch.float32
    mask = torch.ones(2, 3, dtype=dtype, device=device)
    mask[1, 2] = value
    with engine.backend(backend_name), pytest.raises(ValueError, match=r"mask must hold finite weights >= 0.*\[1, 2\]"):
        ops.grpo_loss(torch.randn(2, 3, device=device), torch.randn(2, device=device), mask)


def test_cpu_paths_masked_out_tokens_affect_nothing(monkeypatch):
    """Every CPU path of the C++ kernel (scalar, default, avx2, avx512) selects rather than multiplies."""
    paths = _cpu_paths_here(monkeypatch)
    logp, adv, mask, old, ref = _inputs(3, 2100, torch.float32, adv_per_token=True, has_old=True, has_ref=True,
                                        mask_kind="float")
    mask[0, 1000] = 0.0
    mask[2, 2099] = 0.0  # in the tail
    dirty = [t.clone() for t in (logp, adv, old, ref)]
    for t in dirty:
        t[0, 1000] = float("nan")
        t[2, 2099] = float("inf")
    upstream = torch.tensor(0.7)
    kw = dict(kl_coef=0.1)
    for path in paths:
        monkeypatch.setenv("ENGINE_GRPO_CPU", path)
        clean = _run("cpp", logp, adv, mask, upstream, old_logp=old, ref_logp=ref, **kw)
        got = _run("cpp", dirty[0], dirty[1], mask, upstream, old_logp=dirty[2], ref_logp=dirty[3], **kw)
        torch.testing.assert_close(got[0], clean[0], msg=lambda m: f"{path}: {m}")
        for k in METRICS:
            torch.testing.assert_close(got[1][k], clean[1][k], msg=lambda m: f"{path} {k}: {m}")
        torch.testing.assert_close(got[2], clean[2], msg=lambda m: f"{path} dlogp: {m}")
