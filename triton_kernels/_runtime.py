"""Where the Triton kernels run: compiled for a GPU, or in Triton's CPU interpreter.

The interpreter must be switched on (`TRITON_INTERPRET=1`) before any kernel is defined
(tests do it in `conftest.py`). Launchers pick smaller grids and larger blocks there, because
the interpreter pays per program, not per element. This module is the kernels' own: nothing
under `triton_kernels/` imports `engine` (the engine depends on the kernels, not back).
"""
import os


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
