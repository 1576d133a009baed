"""engine.ops.patch_embed: Qwen2.5-VL's PatchEmbed (Conv3d, kernel == stride) as a GEMM, forward + backward.

The patches of 8 images of 448x448 ([8192, 1176]) times a [1280, 1176] weight, backward into
pixel_values and weight: 3 GEMMs of 2 N K D FLOPs each (compute-bound: the floor is "matmul").
Rows: each backend, with its time ratio to the `torch` row (engine.reference, F.linear) of the same run.
Run: pytest bench/test_bench_patch_embed.py --benchmark-only
"""
import pytest
import torch

import engine
import engine.ops as ops
from bench.common import on_device, timed, vision_weight
from bench.common import VISION_D as D, VISION_DTYPES as DTYPES, VISION_FLOPS as FLOPS, VISION_K as K, VISION_N as N


def inputs(device, dtype):
    """(pixel_values [N, K], weight [D, C, Tp, P, P], grad [N, D]) on `device`, requiring grad."""
    gen = on_device(device)
    pv = torch.randn(N, K, generator=gen, device=device).to(dtype).requires_grad_()
    weight = vision_weight(device, dtype, gen).requires_grad_()
    grad = torch.randn(N, D, generator=gen, device=device).to(dtype)
    return pv, weight, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bench_patch_embed(benchmark, record, bench_backend, device, dtype):
    """patch_embed alone (pixel_values given): forward + backward into pixel_values and weight."""
    pv, w, g = inputs(device, dtype)

    def fn():
        with engine.backend(bench_backend):
            out = ops.patch_embed(pv, w)
        return torch.autograd.grad(out, (pv, w), g)

    timed(benchmark, fn, device, rounds=5)
    name = str(dtype).replace("torch.", "")
    record(benchmark, group=f"patch_embed fwd+bwd [{N}, {K}] x [{D}, {K}] {name}", backend=bench_backend,
           flops=3 * FLOPS, floor="matmul", dtype=name)
