"""engine.ops.grpo_loss: every backend and the reference against an fp64 evaluation of the formulas.

The fp64 truth is this file's own code (the contract, docs/ops.md#grpo_loss), never
`engine.reference`; `assert_matches_fp64` bounds the backend's error and the reference's alike, so a
wrong reference fails as surely as a wrong kernel. Every option combination (kl_type x loss_agg x dual clip on/off x old_logp/ref_logp given or not x
advantages per sequence/per token; on Triton one per compiled kernel variant, `_option_grid`), forward and backward with a random upstream gradient; edge
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

from tests.grpo_truth import *  # noqa: F401,F403  (the fp64 truth, inputs, bounds)
from tests.grpo_truth import FLAGS, _assert_bitwise, _check_all, _fp64, _inputs, _outputs, _run  # noqa: F401

def _option_grid() -> list:
    """(backend, flags, kl_type, loss_agg) rows: the full grid (16 flag rows x 4 kl_types x 4 loss_aggs)
    on every backend but Triton. Triton compiles a kernel per specialization (on a GPU, about a
    second each), and its forward and backward kernels specialize on the four flags and on kl_type
    only where there is a reference (triton_kernels/grpo_loss.py), its finalize kernel on loss_agg:
    there one row per compiled forward/backward variant (8 flag rows without a reference, 8 x 4
    kl_types with one: 40 rows instead of 256), loss_agg cycling so that each one meets both values
    of every flag (and, with a reference, every flag row)."""
    rows = []
    for backend in engine.BACKENDS:
        turn = 0
        for flags in FLAGS:
            for kl_type in KL_TYPES:
                if backend == "triton" and not flags[2] and kl_type != KL_TYPES[0]:
                    continue  # without a reference kl_type changes nothing Triton compiles
                aggs = LOSS_AGGS if backend != "triton" else [LOSS_AGGS[turn % len(LOSS_AGGS)]]
                turn += 1
                for loss_agg in aggs:
                    rows.append(pytest.param(backend, *flags, kl_type, loss_agg,
                                             id=f"backend={backend}-{flags}-{kl_type}-{loss_agg}"))
    return rows


def test_triton_option_rows_cover_every_compiled_variant():
    rows = [p.values[1:] for p in _option_grid() if p.values[0] == "triton"]
    variants = {(*flags, kl if flags[2] else None) for flags in FLAGS for kl in KL_TYPES}
    assert {(*r[:4], r[4] if r[2] else None) for r in rows} == variants and len(rows) == len(variants) == 40
    for i in range(4):
        for value in {r[i] for r in rows}:
            assert {r[5] for r in rows if r[i] == value} == set(LOSS_AGGS)


@pytest.mark.parametrize("backend_name,dual_clip,has_old,has_ref,adv_per_token,kl_type,loss_agg", _option_grid(),
                         indirect=["backend_name"])
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
