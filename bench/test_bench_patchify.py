"""engine.ops.patchify: 8 uint8 images of 448x448 -> the image processor's fp32 pixel_values [8192, 1176].

Bandwidth-bound: it reads B*C*H*W bytes and must write N*K*4 (38.5 MB, the Tp repeat included), so
the floor is "read" bandwidth over those bytes. Rows: each backend (time ratio to the `torch` row,
engine.reference, of the same run) and `hf`, transformers' Qwen2VLImageProcessorPil(do_resize=False),
today's path (on the CPU, from numpy arrays).
Run: pytest bench/test_bench_patchify.py --benchmark-only
"""
import numpy as np
import pytest
import torch

import engine
import engine.ops as ops
from bench.common import on_device, timed, vision_images
from bench.common import VISION_B as B, VISION_C as C, VISION_H as H, VISION_K as K, VISION_N as N
from bench.common import VISION_W as W

BYTES = B * C * H * W + N * K * 4
GROUP = f"patchify {B}x{C}x{H}x{W} uint8 -> [{N}, {K}] fp32"


def images_on(device):
    return vision_images(device, on_device(device))


def test_bench_patchify(benchmark, record, bench_backend, device):
    images = images_on(device)

    with engine.backend(bench_backend):
        timed(benchmark, lambda: ops.patchify(images), device, rounds=10)
    record(benchmark, group=GROUP, backend=bench_backend, bytes=BYTES)


def test_bench_hf_processor(benchmark, record, device):
    proc_mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    proc = proc_mod.Qwen2VLImageProcessorPil(do_resize=False)
    arrays = [np.ascontiguousarray(im.numpy()) for im in images_on(torch.device("cpu"))]  # the processor takes host arrays
    benchmark.pedantic(lambda: proc(images=arrays, return_tensors="pt"), rounds=3, warmup_rounds=1)
    record(benchmark, group=GROUP, backend="hf", bytes=BYTES)
