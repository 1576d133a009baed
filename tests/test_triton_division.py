"""Triton's divisions round to nearest where the contract says so: the divisions by the temperature
(token_logprobs forward and backward) and patchify's normalization. Triton's fp32 `/` compiles to the
approximate `div.full.f32` (up to 2 ulp); `tl.math.div_rn` to `div.rn.f32`, as torch and the CUDA
kernels (`__fdiv_rn`) divide. The interpreter divides in IEEE either way, so the kernels are compiled
for an H100 (sm_90, no GPU needed) and their PTX is read; patchify's rescale factor must arrive as
float64 (a Python float argument is passed as fp32).
"""
import os
import subprocess
import sys

import pytest

from tests.grpo_truth import DEVICE_IS_CUDA

_PTX = r"""
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton_kernels.patchify as P
    import triton_kernels.token_logprobs as T
except Exception as exc:
    print("SKIP triton cannot compile here:", exc); sys.exit(0)

def ptx(fn, sig, consts):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    except (RuntimeError, FileNotFoundError) as exc:
        if "ptxas" in str(exc):
            print("SKIP no ptxas:", exc); sys.exit(0)
        raise

out = {}
out["token_logprobs fwd"] = ptx(T._token_logprobs_fwd_kernel, dict(logits_ptr="*bf16", ids_ptr="*i64", logp_ptr="*fp32",
    stats_ptr="*fp32", entropy_ptr="*fp32", V="i32", stride_row="i64", temperature="fp32"),
    dict(RETURN_ENTROPY=True, BLOCK=4096))
out["token_logprobs bwd"] = ptx(T._token_logprobs_bwd_kernel, dict(logits_ptr="*bf16", grad_ptr="*bf16", ids_ptr="*i64",
    stats_ptr="*fp32", entropy_ptr="*fp32", grad_logp_ptr="*fp32", grad_entropy_ptr="*fp32", V="i32", stride_row="i64",
    stride_grad_row="i64", temperature="fp32"), dict(HAS_GRAD_LOGP=True, HAS_GRAD_ENTROPY=True, BLOCK=4096))
out["patchify"] = ptx(P._patchify_fwd_kernel, dict(img_ptr="*u8", mean_ptr="*fp32", std_ptr="*fp32", out_ptr="*fp32",
    n_rows="i32", H="i32", W="i32", gh="i32", gw="i32", rescale_ptr="*fp64"),
    dict(C=3, T=2, P=14, M=2, BLOCK_M=16, BLOCK_F=256))
for name, text in out.items():
    lines = text.splitlines()
    approx = sum(("div.full.f32" in l or "div.approx" in l) for l in lines)
    rn = sum("div.rn.f32" in l for l in lines)
    f64_load = sum(("ld.global" in l and ".b64" in l) or "ld.global.f64" in l for l in lines)
    print(f"{name}\t{approx}\t{rn}\t{f64_load}")
print("OK")
"""


@pytest.mark.skipif(DEVICE_IS_CUDA, reason="on a GPU the kernels' tests compile and run them")
def test_triton_divisions_round_to_nearest_in_the_ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _PTX], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
    rows = {r[0]: [int(v) for v in r[1:]] for r in (l.split("\t") for l in proc.stdout.splitlines() if "\t" in l)}
    for name, (approx, rn, _) in rows.items():
        assert approx == 0, f"{name}: {approx} approximate fp32 division(s) in the PTX"
        assert rn > 0, f"{name}: no round-to-nearest division in the PTX"
    assert rows["patchify"][2] > 0, "patchify does not load its rescale factor as float64"
