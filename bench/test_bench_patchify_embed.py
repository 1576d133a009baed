"""engine.ops.patchify_embed: 8 uint8 images of 448x448 -> 1280-wide patch embeddings, pixel_values never written.

Rows of each group (same run, same inputs; time ratio to the `torch` row printed at the end):
  <backend>        engine.ops.patchify_embed on that backend (`torch`: engine.reference, patchify in
                   torch ops then F.linear)
  hf               Qwen2VLImageProcessorPil(do_resize=False) + the model's Conv3d PatchEmbed (today's path)
  patchify+linear  engine.ops.patchify (the device's default backend) then F.linear
  gemm             F.linear alone on patches already cut (the bare GEMM of the Conv3d)
FLOPs are the Conv3d's (2 N K D, K = C*Tp*P*P = 1176) for every row, so GFLOP/s compare directly;
the fused kernel does half of them (the Tp frames are one frame: K = 588 after folding).
Run: pytest bench/test_bench_patchify_embed.py --benchmark-only
"""
import pytest
import torch

import engine
import engine.ops as ops
from bench.common import on_device, timed, vision_images, vision_weight
from bench.common import VISION_B as B, VISION_C as C, VISION_D as D, VISION_DTYPES as DTYPES
from bench.common import VISION_FLOPS as FLOPS, VISION_H as H, VISION_K as K, VISION_N as N
from bench.common import VISION_P as P, VISION_TP as TP, VISION_W as W
from engine import reference


def inputs(device, dtype):
    """(images [B, C, H, W] uint8, weight [D, C, Tp, P, P]) on `device`."""
    gen = on_device(device)
    return vision_images(device, gen), vision_weight(device, dtype, gen)


def _record(record, benchmark, dtype, backend):
    # No peak-memory column: on CPU it is the RSS high-water mark, which a warmed-up allocator hides.
    # By construction the fused op allocates its output plus one [256, 592] buffer per thread (CPU) or
    # one <= 8 MB chunk (CUDA); the others write the fp32 pixel_values [N, 1176] (38.5 MB) first.
    name = str(dtype).replace("torch.", "")
    out_bytes = N * D * torch.empty((), dtype=dtype).element_size()
    record(benchmark, group=f"patchify_embed {B}x{C}x{H}x{W} uint8 -> [{N}, {D}] {name}", backend=backend, flops=FLOPS,
           floor="matmul", dtype=name, bytes=B * C * H * W + out_bytes)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bench_patchify_embed(benchmark, record, bench_backend, device, dtype):
    images, weight = inputs(device, dtype)
    with engine.backend(bench_backend):
        timed(benchmark, lambda: ops.patchify_embed(images, weight), device, rounds=10)
    _record(record, benchmark, dtype, bench_backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bench_hf_processor_and_conv3d(benchmark, record, device, dtype):
    proc_mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    model_mod = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    images, weight = inputs(device, dtype)
    proc = proc_mod.Qwen2VLImageProcessorPil(do_resize=False)
    pe = model_mod.Qwen2_5_VisionPatchEmbed(patch_size=P, temporal_patch_size=TP, in_channels=C, embed_dim=D).to(device=device, dtype=dtype)
    with torch.no_grad():
        pe.proj.weight.copy_(weight)
    arrays = [im.numpy() for im in images.cpu()]  # the processor runs on the host, as in today's pipelines

    def fn():
        pv = proc(images=arrays, return_tensors="pt")["pixel_values"].to(device)
        with torch.no_grad():
            return pe(pv)

    out = fn()
    ref, _ = reference.patchify_embed(images, weight)
    torch.testing.assert_close(out.float(), ref.float(), atol=0.05 if dtype != torch.float32 else 1e-4, rtol=0.02)
    timed(benchmark, fn, device, rounds=3)
    _record(record, benchmark, dtype, "hf")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bench_patchify_then_linear(benchmark, record, device, dtype):
    images, weight = inputs(device, dtype)
    w2 = weight.reshape(D, K)
    fn = lambda: torch.nn.functional.linear(ops.patchify(images)[0].to(dtype), w2)  # noqa: E731
    timed(benchmark, fn, device, rounds=10)
    _record(record, benchmark, dtype, "patchify+linear")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bench_bare_gemm(benchmark, record, device, dtype):
    images, weight = inputs(device, dtype)
    pv = reference.patchify(images)[0].to(dtype)
    w2 = weight.reshape(D, K)
    timed(benchmark, lambda: torch.nn.functional.linear(pv, w2), device, rounds=10)
    _record(record, benchmark, dtype, "gemm")
