"""Whether Triton kernels can run, and on what.

On CUDA tensors Triton compiles for the GPU. On CPU tensors it runs only in the interpreter,
which must be switched on (`TRITON_INTERPRET=1`) before any kernel is defined: tests do it in
`conftest.py`.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _import_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # not installed, or broken beside this torch
        return False, f"triton does not import ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def interpreting() -> bool:
    from triton_kernels._runtime import interpreting as _interpreting

    return _interpreting()


def usable_on(device_type: str) -> tuple[bool, str]:
    ok, why = _import_status()
    if not ok:
        return False, why
    if device_type == "cuda":
        return True, f"{why} compiled for the GPU"
    if device_type == "cpu" and interpreting():
        return True, f"{why} in the interpreter (TRITON_INTERPRET=1)"
    return False, f"triton runs CPU tensors only under TRITON_INTERPRET=1, got {device_type}"
