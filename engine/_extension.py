"""Loads the C++/CUDA extension that registers the `torch.ops.engine.*_fwd/_bwd` kernels.

First choice: `engine._C`, built by `setup.py` at install time. Otherwise, from a source
checkout, it is built on first use with ninja (`torch.utils.cpp_extension.load`) into a cache
folder (`ENGINE_BUILD_DIR`, default `~/.cache/pebr_engine/<torch version>`), CPU sources only.
`ENGINE_JIT=0` turns that off. If neither works, ops fall back to the reference and one warning
says why.
"""
from __future__ import annotations

import functools
import glob
import logging
import os
import warnings

import torch

log = logging.getLogger("engine")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def _jit_build() -> None:
    from torch.utils import cpp_extension

    sources = [os.path.join(CSRC, "ops.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    build_dir = os.environ.get("ENGINE_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "pebr_engine", torch.__version__.replace("+", "_")
    )
    os.makedirs(build_dir, exist_ok=True)
    log.info("engine: building the C++ extension with ninja in %s (first use only)", build_dir)
    cpp_extension.load(
        name="engine_C_jit",
        sources=sources,
        extra_cflags=["-O3", "-fopenmp", "-std=c++17"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[CSRC],
        build_directory=build_dir,
        is_python_module=False,
        verbose=os.environ.get("ENGINE_BUILD_VERBOSE") == "1",
    )


@functools.lru_cache(maxsize=None)
def status() -> tuple[bool, str]:
    """(loaded, reason). Loads the extension on the first call."""
    try:
        import engine._C  # noqa: F401

        return True, "C++ extension engine._C (built at install)"
    except ImportError as exc:
        installed_error = exc
    if os.environ.get("ENGINE_JIT", "1") == "0":
        why = f"engine._C is not built ({installed_error}) and ENGINE_JIT=0"
    elif not os.path.exists(os.path.join(CSRC, "ops.cpp")):
        why = f"engine._C is not built ({installed_error}) and no csrc/ to build from"
    else:
        try:
            _jit_build()
            return True, "C++ extension built on first use with ninja"
        except Exception as exc:  # no compiler, no ninja, a compile error: fall back, loudly once
            why = f"building the C++ extension failed: {type(exc).__name__}: {str(exc)[-2000:]}"
    warnings.warn(f"engine: C++ kernels unavailable, CPU ops use the PyTorch reference. {why}", stacklevel=3)
    return False, why


def has_cuda_kernels() -> bool:
    return status()[0] and torch._C._dispatch_has_kernel_for_dispatch_key("engine::token_logprobs_fwd", "CUDA")


def require() -> None:
    """Raise RuntimeError (with the reason) unless the C++ extension is loaded."""
    ok, why = status()
    if not ok:
        raise RuntimeError(f"engine: the C++ kernels are not available: {why}")
