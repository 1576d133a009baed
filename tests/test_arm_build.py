"""The CPU sources build for 64-bit ARM, and the kernels written with ATen's `at::vec` use its NEON vectors.

No ARM machine is at hand, so the sources are cross-compiled to aarch64 assembly with zig's clang
(`pip install ziglang`; the test is skipped without it) against this torch's headers, which hold
ATen's NEON `Vectorized<float>` (ATen/cpu/vec/vec128). The check: the build succeeds, and the
hot loops came out as 4-lane NEON arithmetic (`fmul/fadd/fmla/fmax ... v<n>.4s`), not the scalar
fallback. That the numbers are right on ARM is left to an ARM machine: nothing here runs the code.
"""
import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every CPU source the extension builds (the _avx2/_avx512 variants build their portable fallback
# off x86); the two at::vec kernels must also come out as NEON arithmetic
SOURCES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
VECTORIZED = {"csrc/cpu/grpo_loss.cpp", "csrc/cpu/token_logprobs.cpp"}
NEON_FLOAT_OP = re.compile(r"\bf(mul|add|sub|mla|max|min|div)\s+v\d+\.4s")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ziglang") is None,
                                reason="ziglang (zig's clang, an aarch64 cross-compiler) is not installed")


@pytest.mark.parametrize("source", SOURCES)
def test_cpu_kernel_builds_for_aarch64_with_neon(source, tmp_path):
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    out = tmp_path / "kernel.s"
    cmd = [sys.executable, "-m", "ziglang", "c++", "-target", "aarch64-linux-gnu", "-std=c++20", "-O2", "-S",
           "-w", "-I", os.path.join(ROOT, "csrc"), "-I", include,
           "-I", os.path.join(include, "torch", "csrc", "api", "include"), "-o", str(out), os.path.join(ROOT, source)]
    env = dict(os.environ, ZIG_GLOBAL_CACHE_DIR=str(tmp_path / "zig-cache"), ZIG_LOCAL_CACHE_DIR=str(tmp_path / "zig-local"))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"aarch64 build of {source} failed:\n{res.stderr[-6000:]}"
    asm = out.read_bytes().decode("latin-1")  # assembly is ASCII but for string constants
    if source not in VECTORIZED:  # built (the x86 variants hold nothing off x86)
        return
    assert re.search(r"\bx29\b", asm), "not aarch64 assembly (no frame-pointer register x29)"
    ops = NEON_FLOAT_OP.findall(asm)
    assert len(ops) >= 8, f"{source}: {len(ops)} NEON 4-lane float ops in the aarch64 build; the at::vec path is not vectorized"
