"""Qwen2.5-VL's vision front end: 8 images of 448x448 uint8 -> 1280-wide patch embeddings.

Rows of each group (same run, same inputs; time ratio to the `torch` row printed at the end):
  hf               Qwen2VLImageProcessorPil(do_resize=False) + the model's Conv3d PatchEmbed (today's path)
  torch            engine.reference.patchify_embed (patchify in torch ops, then F.linear)
  cpp              engine.ops.patchify_embed: raw pixels -> embeddings, pixel_values never written
  patchify+linear  engine.ops.patchify (cpp) then F.linear
  gemm             F.linear alone on patches already cut (the bare GEMM of the Conv3d)
FLOPs are the Conv3d's (2 N K D, K = C*Tp*P*P = 1176) for every row, so GFLOP/s compare directly;
the fused kernel does half of them (the Tp frames are one frame: K = 588 after folding).
Run: pytest bench/test_bench_patch_embed.py --benchmark-only
"""
import numpy as np
import pytest
import torch

import engine
import engine.ops as ops
from engine import reference

B, H, W, D = 8, 448, 448, 1280
C, TP, P = 3, 2, 14
K = C * TP * P * P
N = B * (H // P) * (W // P)
FLOPS = 2 * N * K * D
DTYPES = [torch.float32, torch.bfloat16]


def inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, generator=gen)
    weight = (torch.randn(D, C, TP, P, P, generator=gen) * 0.02).to(dtype)
    return images, weight


def group(dtype) -> str:
    return f"patchify_embed {B}x{C}x{H}x{W} uint8 -> [{N}, {D}] {str(dtype).replace('torch.', '')}"


def _record(record, benchmark, dtype, backend, fn):
    # No peak-memory column: on CPU it is the RSS high-water mark, which a warmed-up allocator hides.
    # By construction the fused op allocates its output plus one [256, 592] buffer per thread; the
    # others write the fp32 pixel_values [N, 1176] (38.5 MB) first.
    out_bytes = N * D * torch.empty((), dtype=dtype).element_size()
    record(benchmark, group=group(dtype), backend=backend, flops=FLOPS, floor="matmul", dtype=str(dtype).replace("torch.", ""),
           bytes=B * C * H * W + out_bytes)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bench_patchify_embed(benchmark, record, bench_backend, dtype):
    images, weight = inputs(dtype)
    with engine.backend(bench_backend):
        fn = lambda: ops.patchify_embed(images, weight)  # noqa: E731
        benchmark.pedantic(fn, rounds=10, warmup_rounds=1)
        _record(record, benchmark, dtype, bench_backend, fn)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bench_hf_processor_and_conv3d(benchmark, record, dtype):
    proc_mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    model_mod = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    images, weight = inputs(dtype)
    proc = proc_mod.Qwen2VLImageProcessorPil(do_resize=False)
    pe = model_mod.Qwen2_5_VisionPatchEmbed(patch_size=P, temporal_patch_size=TP, in_channels=C, embed_dim=D).to(dtype)
    with torch.no_grad():
        pe.proj.weight.copy_(weight)
    arrays = [im.numpy() for im in images]

    def fn():
        pv = proc(images=arrays, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return pe(pv)

    out = fn()
    ref, _ = reference.patchify_embed(images, weight)
    torch.testing.assert_close(out.float(), ref.float(), atol=0.05 if dtype != torch.float32 else 1e-4, rtol=0.02)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    _record(record, benchmark, dtype, "hf", fn)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bench_patchify_then_linear(benchmark, record, dtype):
    images, weight = inputs(dtype)
    w2 = weight.reshape(D, K)
    fn = lambda: torch.nn.functional.linear(ops.patchify(images)[0].to(dtype), w2)  # noqa: E731
    benchmark.pedantic(fn, rounds=10, warmup_rounds=1)
    _record(record, benchmark, dtype, "patchify+linear", fn)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bench_bare_gemm(benchmark, record, dtype):
    images, weight = inputs(dtype)
    pv = reference.patchify(images)[0].to(dtype)
    w2 = weight.reshape(D, K)
    fn = lambda: torch.nn.functional.linear(pv, w2)  # noqa: E731
    benchmark.pedantic(fn, rounds=10, warmup_rounds=1)
    _record(record, benchmark, dtype, "gemm", fn)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bench_patch_embed(benchmark, record, bench_backend, dtype):
    """patch_embed alone (pixel_values given): the GEMM, forward + backward into pixel_values, weight."""
    images, weight = inputs(dtype)
    pv = reference.patchify(images)[0].to(dtype).requires_grad_()
    w = weight.clone().requires_grad_()
    g = torch.randn(N, D).to(dtype)

    def fn():
        with engine.backend(bench_backend):
            out = ops.patch_embed(pv, w)
        return torch.autograd.grad(out, (pv, w), g)

    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    record(benchmark, group=f"patch_embed fwd+bwd [{N}, {K}] x [{D}, {K}] {str(dtype).replace('torch.', '')}", backend=bench_backend,
           flops=3 * FLOPS, floor="matmul", dtype=str(dtype).replace("torch.", ""))


def test_bench_patchify(benchmark, record, bench_backend):
    """patchify alone: uint8 -> the processor's fp32 pixel_values (bandwidth: writes N*K*4 bytes)."""
    images, _ = inputs(torch.float32)
    with engine.backend(bench_backend):
        benchmark.pedantic(lambda: ops.patchify(images), rounds=10, warmup_rounds=1)
    record(benchmark, group=f"patchify {B}x{C}x{H}x{W} uint8 -> [{N}, {K}] fp32", backend=bench_backend, bytes=B * C * H * W + N * K * 4)


def test_bench_hf_processor_alone(benchmark, record):
    proc_mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    images, _ = inputs(torch.float32)
    proc = proc_mod.Qwen2VLImageProcessorPil(do_resize=False)
    arrays = [np.ascontiguousarray(im.numpy()) for im in images]
    benchmark.pedantic(lambda: proc(images=arrays, return_tensors="pt"), rounds=3, warmup_rounds=1)
    record(benchmark, group=f"patchify {B}x{C}x{H}x{W} uint8 -> [{N}, {K}] fp32", backend="hf", bytes=B * C * H * W + N * K * 4)
