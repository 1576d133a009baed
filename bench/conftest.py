"""Benchmark bookkeeping: every benchmark records its backend's median in a group, and the
session ends with one table per group, each row's time ratio to the `torch` reference measured
in the same run, its throughput, and its fraction of the machine's floor.

Run: `pytest bench/ --benchmark-only`. Tensors live on `ENGINE_TEST_DEVICE` (default cpu).
Times: pytest-benchmark's clock on CPU; CUDA events with the L2 flushed on a GPU (bench.common.timed).
`ENGINE_BENCH_JSONL=path`: each row is appended there as it is measured (the floors first), so a run
cut short by a time limit still leaves its rows (bench/gpu.sh reads them).
"""
import os

if os.environ.get("ENGINE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import engine  # noqa: E402
from bench.common import TIMED_REGION, machine_floors  # noqa: E402


def _append_jsonl(obj: dict) -> None:
    path = os.environ.get("ENGINE_BENCH_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")

DEVICE = torch.device(os.environ.get("ENGINE_TEST_DEVICE", "cpu"))
# Benchmarked backends on this device: the reference and the fast ones that are real here
# (Triton under the CPU interpreter is a correctness tool, not a speed one: not benchmarked).
BENCH_BACKENDS = [b for b in engine.available_backends(DEVICE.type) if not (b == "triton" and DEVICE.type == "cpu")]
_RESULTS: list[dict] = []


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=list(engine.BACKENDS), ids=lambda b: f"backend={b}")
def bench_backend(request) -> str:
    if request.param not in BENCH_BACKENDS:
        pytest.skip(f"backend {request.param} is not benchmarked on {DEVICE.type} here")
    return request.param


@pytest.fixture
def record():
    """record(benchmark, group=..., backend=..., bytes=..., flops=..., peak_bytes=..., floor=...)

    `bytes`: what the op must move at least (inputs read + outputs written once);
    `flops`: what it must compute; `floor`: "read" (bandwidth-bound) or "matmul" (compute-bound).
    """

    def _record(benchmark, *, group: str, backend: str, bytes: int = 0, flops: int = 0, peak_bytes=None, floor="read", dtype="float32"):
        median = benchmark.extra_info.get("device_median_s")  # the GPU's own clock (bench.common.timed)
        if median is None:
            if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing was timed
                return
            median = benchmark.stats.stats.median
        if not _RESULTS:  # the floors once, before the first row, so the JSONL has them even if cut short
            _append_jsonl({"device": DEVICE.type, "floors": machine_floors(DEVICE.type), "timed_region": TIMED_REGION})
        row = dict(group=group, backend=backend, median_ms=median * 1e3, bytes=bytes, flops=flops, floor=floor, dtype=dtype,
                   timer=benchmark.extra_info.get("timer", "pytest-benchmark (host clock)"))
        if bytes:
            row["GBps"] = bytes / median / 1e9
        if flops:
            row["TFLOPs"] = flops / median / 1e12
        if peak_bytes is not None:
            row["peak_extra_MB"] = peak_bytes / 1e6
        benchmark.extra_info.update(row)
        _RESULTS.append(row)
        _append_jsonl(row)

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    floors = machine_floors(DEVICE.type)
    tr = terminalreporter
    tr.section(f"engine: each backend against the torch reference, same run ({DEVICE.type})")
    tr.write_line(
        "floors measured now: " + ", ".join(f"{k} {v:.1f}" for k, v in floors.items())
    )
    tr.write_line(f"timed: {TIMED_REGION}")
    groups: dict[str, list[dict]] = {}
    for row in _RESULTS:
        groups.setdefault(row["group"], []).append(row)
    for group, rows in groups.items():
        ref = next((r for r in rows if r["backend"] == "torch"), None)
        liger = next((r for r in rows if r["backend"] == "liger"), None)  # Liger-Kernel, where importable (CUDA)
        tr.write_line(f"{group}")
        for r in rows:
            parts = [f"  {r['backend']:<7} {r['median_ms']:10.3f} ms"]
            if ref is not None:
                r["speedup_vs_torch"] = ref["median_ms"] / r["median_ms"]
                parts.append(f"{r['speedup_vs_torch']:6.2f}x vs torch")
            if liger is not None:
                r["speedup_vs_liger"] = liger["median_ms"] / r["median_ms"]
                parts.append(f"{r['speedup_vs_liger']:6.2f}x vs liger")
            if "GBps" in r:
                parts.append(f"{r['GBps']:8.1f} GB/s ({100 * r['GBps'] / floors['read_GBps']:.0f}% of read BW)")
            if "TFLOPs" in r:
                key = f"{r['dtype'] if r['dtype'] != 'float16' else 'bfloat16'}_matmul_TFLOPs"
                peak = floors.get(key, floors["float32_matmul_TFLOPs"])
                parts.append(f"{r['TFLOPs'] * 1e3:8.1f} GFLOP/s ({100 * r['TFLOPs'] / peak:.0f}% of {key})")
            if "peak_extra_MB" in r:
                rel = ""
                if ref is not None and ref.get("peak_extra_MB"):
                    rel = f" = {100 * r['peak_extra_MB'] / ref['peak_extra_MB']:.1f}% of torch's"
                parts.append(f"peak extra {r['peak_extra_MB']:.1f} MB{rel}")
            tr.write_line("  ".join(parts))
    out = os.environ.get("ENGINE_BENCH_JSON")
    if out:
        with open(out, "w") as f:
            json.dump({"device": DEVICE.type, "floors": floors, "results": _RESULTS}, f, indent=1)
