"""grpo_loss forward + backward (old_logp, ref_logp, kl_coef=0.01, low_var_kl, token-mean), each
backend against autograd through the reference, and the forward alone. Contract: docs/ops.md#grpo_loss.

Bytes the op must move: read logp, old_logp, ref_logp, advantages, mask once; write dlogp once.
On CPU each group's name says which path of the C++ kernel ran (csrc/cpu/grpo_loss.cpp: avx512,
avx2, default or scalar; ENGINE_GRPO_CPU=avx2 or ATEN_CPU_CAPABILITY=avx2 times the AVX2 build on an
AVX-512 machine).
Run: pytest bench/test_bench_grpo_loss.py --benchmark-only
"""
import pytest
import torch

import engine
import engine.ops as ops
from bench.common import on_device, timed

SHAPES = [(64, 2048), (512, 2048)]


def _inputs(B, T, device, dtype=torch.float32):
    g, kw = on_device(device), dict(device=device)
    logp32 = torch.randn(B, T, generator=g, **kw) * 0.5 - 2
    old = (logp32 + 0.1 * torch.randn(B, T, generator=g, **kw)).to(dtype)
    ref = (logp32 + 0.1 * torch.randn(B, T, generator=g, **kw)).to(dtype)
    logp = logp32.to(dtype)
    adv = torch.randn(B, generator=g, **kw)
    mask = torch.rand(B, T, generator=g, **kw) > 0.2
    return logp, adv, mask, old, ref


def _bytes(logp, adv, mask, old, ref, *, backward):
    moved = sum(t.numel() * t.element_size() for t in (logp, adv, mask, old, ref))
    return moved + (logp.numel() * logp.element_size() if backward else 0)


def _cpu_path(device) -> str:
    """", C++ CPU path <name>" on CPU where the cpp backend is built, else ""."""
    if device.type != "cpu" or "cpp" not in engine.available_backends("cpu"):
        return ""
    return f", C++ CPU path {torch.ops.engine.grpo_loss_cpu_path()}"


@pytest.mark.parametrize("B,T", SHAPES, ids=lambda v: str(v))
def test_grpo_loss_fwd_bwd(benchmark, record, bench_backend, device, B, T):
    logp, adv, mask, old, ref = _inputs(B, T, device)
    x = logp.clone().requires_grad_()

    def step():
        x.grad = None
        loss, _ = ops.grpo_loss(x, adv, mask, old_logp=old, ref_logp=ref, kl_coef=0.01)
        loss.backward()
        return x.grad

    with engine.backend(bench_backend):
        # many single-call rounds: the median then ignores calls stalled by other processes on the cores
        timed(benchmark, step, device, rounds=100 if B <= 64 else 10)
    record(benchmark, group=f"grpo_loss fwd+bwd B={B} T={T} float32{_cpu_path(device)}", backend=bench_backend,
           bytes=_bytes(logp, adv, mask, old, ref, backward=True))


@pytest.mark.parametrize("B,T", SHAPES[:1], ids=lambda v: str(v))
def test_grpo_loss_fwd(benchmark, record, bench_backend, device, B, T):
    logp, adv, mask, old, ref = _inputs(B, T, device)

    def fwd():
        return ops.grpo_loss(logp, adv, mask, old_logp=old, ref_logp=ref, kl_coef=0.01)

    with engine.backend(bench_backend):
        timed(benchmark, fwd, device, rounds=100)
    record(benchmark, group=f"grpo_loss fwd B={B} T={T} float32{_cpu_path(device)}", backend=bench_backend,
           bytes=_bytes(logp, adv, mask, old, ref, backward=False))
