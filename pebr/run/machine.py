"""One line naming the machine a run's figures come from, for train.log and the benchmarks.

    log.info(describe(torch.device("cpu")))
    # machine: Intel(R) Xeon(R) Processor, 2 threads, ATen capability AVX512, engine CPU kernels avx512 (C++ extension engine._C (built at install)), torch 2.13.0+cpu

Step times differ by 2x between an AVX-512 and an AVX2-only CPU of the same core count, so a
figure without its CPU and vector path cannot be compared with another: every run says both.
`ATEN_CPU_CAPABILITY=avx2` caps ATen's kernels and the engine's alike (csrc/cpu/cpu_isa.h); the
line shows the capped value.
"""
from __future__ import annotations

import platform

import torch


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):  # x86; some ARM boards
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def engine_cpu_path() -> str:
    """The vector path the engine's CPU kernels take (scalar, default, avx2, avx512), or why none."""
    from engine import _extension

    loaded, why = _extension.status()
    if not loaded:
        return f"not loaded, PyTorch reference ({why[:120]})"
    try:
        return f"{torch.ops.engine.grpo_loss_cpu_path()} ({why})"
    except (AttributeError, RuntimeError):  # a library loaded from elsewhere without the query
        return f"unknown path ({why})"


def describe(device: torch.device | str = "cpu") -> str:
    """'machine: CPU, threads, ATen capability, engine CPU kernels, [GPU,] torch' in one line."""
    device = torch.device(device)
    parts = [cpu_name(), f"{torch.get_num_threads()} threads",
             f"ATen capability {torch.backends.cpu.get_cpu_capability()}", f"engine CPU kernels {engine_cpu_path()}"]
    if device.type == "cuda" and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    parts.append(f"torch {torch.__version__}")
    return "machine: " + ", ".join(parts)
