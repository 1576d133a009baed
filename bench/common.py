"""Helpers every benchmark uses: peak extra memory, the machine's floors, throughput bookkeeping."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import re
import time

import torch


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024


@contextlib.contextmanager
def _glibc_mmaps_large_blocks():
    """While measuring CPU peak memory through RSS: glibc serves blocks >= 1 MiB from fresh mmaps
    and freed memory goes back to the OS, so a buffer reused from an earlier round (which RSS
    would not see grow) is counted. Afterwards the threshold is 32 MiB, where glibc's dynamic
    threshold settles anyway once a block that large has been freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: measure as is
        yield
        return
    M_MMAP_THRESHOLD = -3
    trim(0)
    mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory `fn()` allocates above what is live before it (its inputs), in bytes.

    CUDA: the caching allocator's peak. CPU: the process's resident high-water mark, reset
    through /proc/self/clear_refs (Linux), so run nothing else in the process meanwhile.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _glibc_mmaps_large_blocks():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            base = _proc_status_bytes("VmRSS")
            out = fn()
            peak = _proc_status_bytes("VmHWM") - base
    del out
    gc.collect()
    return max(peak, 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=None)
def machine_floors(device_type: str) -> dict:
    """Measured once per session: read bandwidth (GB/s) and fp32/bf16 matmul rates (TFLOP/s)."""
    device = torch.device(device_type)
    x = torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_()  # 256 MiB
    read_s = _median_time(lambda: x.sum(), device)
    y = torch.empty_like(x)
    copy_s = _median_time(lambda: y.copy_(x), device)
    floors = {"read_GBps": x.nbytes / read_s / 1e9, "copy_GBps": 2 * x.nbytes / copy_s / 1e9}
    n = 4096 if device_type == "cuda" else 2048
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device, dtype=dtype)
        t = _median_time(lambda: a @ a, device)
        floors[f"{str(dtype).replace('torch.', '')}_matmul_TFLOPs"] = 2 * n**3 / t / 1e12
    return floors


# ---- the patch ops' workload (test_bench_patch_embed.py, test_bench_patchify_embed.py,
# test_bench_patchify.py): Qwen2.5-VL's vision PatchEmbed on 8 uint8 images of 448x448 ----
VISION_B, VISION_H, VISION_W, VISION_D = 8, 448, 448, 1280  # images, height, width, embedding width
VISION_C, VISION_TP, VISION_P = 3, 2, 14  # channels, temporal patch, patch
VISION_K = VISION_C * VISION_TP * VISION_P * VISION_P  # features of a patch (1176)
VISION_N = VISION_B * (VISION_H // VISION_P) * (VISION_W // VISION_P)  # patches (8192)
VISION_FLOPS = 2 * VISION_N * VISION_K * VISION_D  # the Conv3d as one GEMM
VISION_DTYPES = [torch.float32, torch.bfloat16]


def vision_images(device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """uint8 [B, C, H, W] random pixels on `device`, drawn from `gen`."""
    shape = (VISION_B, VISION_C, VISION_H, VISION_W)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)


def vision_weight(device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A PatchEmbed weight [D, C, Tp, P, P] (std 0.02) on `device`, drawn from `gen`."""
    w = torch.randn(VISION_D, VISION_C, VISION_TP, VISION_P, VISION_P, generator=gen) * 0.02
    return w.to(device=device, dtype=dtype)
