"""Named ranges for profilers: NVTX on CUDA (Nsight Systems), record_function under the PyTorch profiler.

    with nvtx.range("policy_forward"):
        ...
    grpo_loss = nvtx.ranged("engine.ops.grpo_loss")(grpo_loss)

A range costs a check of one flag when no profiler runs (about 50 ns on CPU; `record_function`
on its own costs about 6 us, so it is entered only while a profiler is on). With a profiler:
- the PyTorch profiler (`torch.profiler.profile`, CPU or CUDA) or `torch.autograd.profiler.emit_nvtx`
  is on: a `record_function` range, which shows in its Chrome trace and, under emit_nvtx, as NVTX;
- otherwise, with CUDA present: `torch.cuda.nvtx.range_push/pop`, which Nsight Systems records
  (`nsys profile -t cuda,nvtx`) and which are no-ops without a tool attached.
Names are the same in both, so a range found in a CPU trace is the range nsys shows on a GPU.
"""
from __future__ import annotations

import contextlib
import functools

import torch

_profiler_on = torch._C._autograd._profiler_enabled  # True under torch.profiler and emit_nvtx


@functools.cache
def _cuda() -> bool:
    # asked once: torch.cuda.is_available() initializes nothing but costs a driver call
    return torch.cuda.is_available()


@contextlib.contextmanager
def range(name: str):
    """A profiler range named `name` around the block (see the module docstring for which kind)."""
    if torch.compiler.is_compiling():
        yield
    elif _profiler_on():
        with torch.profiler.record_function(name):
            yield
    elif _cuda():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def ranged(name: str):
    """Decorator: every call of the function inside `range(name)`; its signature and docstring kept."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if torch.compiler.is_compiling():  # traced by torch.compile: no range (the flag is no graph op)
                return fn(*args, **kwargs)
            with range(name):
                return fn(*args, **kwargs)

        return inner

    return wrap
