"""engine.ops.grpo_loss: every CPU path of the C++ kernel (scalar, default, AVX2, AVX-512 builds)
against fp64, against each other, across thread counts (split from tests/test_grpo_loss.py)."""
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
from tests.grpo_truth import *  # noqa: F401,F403
from tests.grpo_truth import _assert_bitwise, _check_all, _fp64, _inputs, _outputs, _run  # noqa: F401

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
                elif name == "loss" and loss_agg == "seq-mean-token-sum":
                    # each row's loss sums its T = 2100 per-token terms, in another order on each path: fp32
                    # rounding bounded by T * eps * max|term| (|term| <= |A| * max(1 + clip_high, dual_clip)
                    # + kl_coef * max|kl|, the k3 KL clamped to 10). Seen: 3.0e-5 on a loss of 2.24 (fp16, k1),
                    # beyond the 1e-5 relative bound of the mean aggregations.
                    term = float(adv.abs().max()) * max(1.3, dual_clip or 0.0) + 0.1 * (10.0 + float((logp - ref).abs().max()))
                    tol = dict(rtol=1e-5, atol=2100 * 1.2e-7 * term)
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
