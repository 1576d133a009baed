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
    if device.type == "cuda":
        return cuda_median_s(fn, rounds=repeats)
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# Larger than any current card's L2 (H100 50 MB, H200 60 MB, B200 126 MB): zeroing it between rounds
# evicts the inputs, so each round reads them from HBM as a training step would.
_L2_FLUSH_BYTES = 256 * 2**20


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer(index: int) -> torch.Tensor:
    return torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=torch.device("cuda", index))


def cuda_median_s(fn, *, rounds: int = 10, warmup_rounds: int = 1, min_rounds: int = 3, budget_s: float = 1.0) -> float:
    """Median GPU time of `fn()` in seconds, by CUDA events around each call (what
    `triton.testing.do_bench` does, without its API changes between Triton versions).

    Warm-up calls first (compilation, autotuning, allocator growth), then up to `rounds` timed calls,
    fewer when they would exceed `budget_s` (never under `min_rounds`); the L2 cache is flushed before
    each. The host waits only once per round, after the end event, so launch overhead counts only
    where the GPU would idle on it.
    """
    flush = _l2_flush_buffer(torch.cuda.current_device())
    for _ in range(max(warmup_rounds, 1)):
        fn()
    torch.cuda.synchronize()
    times = []
    started = time.perf_counter()
    for i in range(max(rounds, min_rounds)):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        if i + 1 >= min_rounds and time.perf_counter() - started > budget_s:
            break
    return sorted(times)[len(times) // 2]


# What a benchmark row's time holds, printed with the results (bench/conftest.py, bench/gpu_report.py).
TIMED_REGION = (
    "each row times whole calls of the op as a training step makes them (engine.ops dispatch, shape/dtype "
    "checks, output allocation, every kernel launch; forward and backward where the group says fwd+bwd); "
    "the value checks (ids in range, finite rows/rewards, mask weights: a host synchronization each) run "
    "outside the timing for every backend alike, the torch reference included (engine._validate."
    "data_checks_off); inputs are "
    "made before it; on CUDA the L2 is flushed between rounds and CUDA events time each call"
)


def timed(benchmark, fn, device: torch.device, *, rounds: int, warmup_rounds: int = 1, iterations: int = 1) -> None:
    """Times `fn` for `benchmark` on `device`: pytest-benchmark's clock on CPU; CUDA events on a GPU.
    `fn` runs with the ops' value checks off (TIMED_REGION says why): each would add a host
    synchronization, and a GPU left idle while the host waits, to a time meant to be the kernels'.

    On CUDA the fixture still runs `fn` once (synchronized), so pytest-benchmark sees it used and its
    table lists the test, but its host clock would measure launches, not kernels: the GPU median goes
    into `benchmark.extra_info["device_median_s"]`, which `record` (bench/conftest.py) prefers.
    """
    from engine._validate import data_checks_off

    fn_checked = fn

    def fn():
        with data_checks_off():
            return fn_checked()

    if device.type != "cuda":
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup_rounds, iterations=iterations)
        return
    if getattr(benchmark, "disabled", False):  # --benchmark-disable: a smoke run, one call
        benchmark.pedantic(fn, rounds=1)
        return
    benchmark.extra_info["device_median_s"] = cuda_median_s(fn, rounds=max(rounds, 10), warmup_rounds=warmup_rounds)
    benchmark.extra_info["timer"] = "cuda events, L2 flushed"

    def once():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(once, rounds=1, iterations=1)


def on_device(device: torch.device, seed: int = 0) -> torch.Generator:
    """A generator living on `device`, so inputs are drawn there (no host draw and copy)."""
    return torch.Generator(device=device).manual_seed(seed)


@functools.lru_cache(maxsize=None)
def machine_floors(device_type: str) -> dict:
    """Measured once per session: read bandwidth (GB/s) and fp32/bf16 matmul rates (TFLOP/s)."""
    device = torch.device(device_type)
    x = torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_()  # 256 MiB
    read_s = _median_time(lambda: x.sum(), device)
    y = torch.empty_like(x)
    copy_s = _median_time(lambda: y.copy_(x), device)
    floors = {"read_GBps": x.nbytes / read_s / 1e9, "copy_GBps": 2 * x.nbytes / copy_s / 1e9}
    # CUDA: 8192^3 (a few ms on an H100) reaches the tensor cores' rate, 4096^3 falls short of it
    n = 8192 if device_type == "cuda" else 2048
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
    """uint8 [B, C, H, W] random pixels on `device`, drawn from `gen` (on gen's device: pass `on_device(device)`)."""
    shape = (VISION_B, VISION_C, VISION_H, VISION_W)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen, device=gen.device).to(device)


def vision_weight(device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A PatchEmbed weight [D, C, Tp, P, P] (std 0.02) on `device`, drawn from `gen`."""
    w = torch.randn(VISION_D, VISION_C, VISION_TP, VISION_P, VISION_P, generator=gen, device=gen.device) * 0.02
    return w.to(device=device, dtype=dtype)


def liger_or_skip(device: torch.device, name: str):
    """`liger_kernel.transformers.<name>` for a `liger` row: skipped (with the reason) off CUDA or where
    Liger-Kernel is not importable, so the row exists only where the comparison means something."""
    import pytest

    if device.type != "cuda":
        pytest.skip("liger rows run on CUDA only (Liger-Kernel is Triton on GPU)")
    try:
        import liger_kernel.transformers as liger
    except Exception as e:  # not installed, or built against another torch/triton
        pytest.skip(f"liger_kernel is not importable here: {type(e).__name__}: {e}")
    return getattr(liger, name)
