"""Loads the C++/CUDA extension that registers the `torch.ops.engine.*_fwd/_bwd` kernels.

First choice: `engine._C`, built by `setup.py` at install time. Otherwise, from a source
checkout, it is built on first use with ninja (`torch.utils.cpp_extension.load`) into a cache
folder (`ENGINE_BUILD_DIR`, default `~/.cache/pebr_engine/<torch version>`), CPU sources only.
`ENGINE_JIT=0` turns that off. If neither works, ops fall back to the reference and one warning
says why.

A library loaded before (`torch.ops.load_library` of the CMake build configured with
`-DENGINE_NAMESPACE=engine`) may already define `torch.ops.engine`. A namespace can be defined once
per process, and torch aborts the process (from inside dlopen, no exception) on a second
definition, so then engine._C is not loaded: its kernels are used when their schemas are those of
csrc/ops.cpp, the reference otherwise. The default CMake build registers `engine_standalone` and
never meets this (docs/backends.md, "The CMake library").
"""
from __future__ import annotations

import functools
import glob
import logging
import os
import re
import sys
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


# A kernel schema csrc/ops.cpp defines: registered means some library defined the namespace.
_PROBE_OP = "engine::token_logprobs_fwd"


def _ops_cpp_schemas() -> dict[str, str] | None:
    """name -> normalized schema of every `m.def` in csrc/ops.cpp; None without csrc/ (an install)."""
    path = os.path.join(CSRC, "ops.cpp")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    out = {}
    # m.def("name(args) -> ret") with the string literal split over several lines.
    for call in re.finditer(r'm\.def\(((?:\s*"[^"]*")+)\s*\)', text):
        try:
            schema = torch._C.parse_schema("engine::" + "".join(re.findall(r'"([^"]*)"', call.group(1))))
        except RuntimeError:  # not parsed as written: no list to compare against
            return None
        out[schema.name] = str(schema)
    return out or None


def _defined_elsewhere() -> tuple[bool, str] | None:
    """None when no library has defined `torch.ops.engine` kernels yet; else (usable, reason)."""
    if "engine._C" in sys.modules or not torch._C._jit_get_schemas_for_operator(_PROBE_OP):
        return None
    where = "a library loaded before engine defines torch.ops.engine (e.g. the CMake build with -DENGINE_NAMESPACE=engine)"
    expected = _ops_cpp_schemas()
    if expected is None:
        return True, f"{where}; its kernels are used, engine._C is not loaded"
    differ = []
    for name, schema in expected.items():
        found = [str(s) for s in torch._C._jit_get_schemas_for_operator(name)]
        if schema not in found:
            differ.append(f"{name}: csrc/ops.cpp has {schema}, loaded {found or 'nothing'}")
        elif not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"):
            differ.append(f"{name} has no CPU kernel")
    if differ:
        return False, f"{where} but not as csrc/ops.cpp does (rebuild it): " + "; ".join(differ[:3])
    return True, f"{where}; its kernels (same schemas as csrc/ops.cpp) are used, engine._C is not loaded"


@functools.lru_cache(maxsize=None)
def status() -> tuple[bool, str]:
    """(loaded, reason). Loads the extension on the first call."""
    elsewhere = _defined_elsewhere()
    if elsewhere is not None:
        # Loading engine._C now would define the namespace twice: the process would abort.
        ok, why = elsewhere
        if ok:
            log.info("engine: %s", why)
            return True, why
        warnings.warn(f"engine: C++ kernels unavailable, CPU ops use the PyTorch reference. {why}", stacklevel=3)
        return False, why
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
