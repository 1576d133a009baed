"""Backend selection for every op in `engine.ops`.

Four backends: `torch` (the reference, always there), `cpp` (csrc, CPU tensors), `cuda` (csrc,
CUDA tensors), `triton` (CUDA tensors; CPU tensors only under `TRITON_INTERPRET=1`).

Order of precedence: `with engine.backend(name):` > `ENGINE_BACKEND=name` > the default for the
device (CUDA: cuda, then triton, then torch; CPU: cpp, then torch). A forced backend that cannot
run the given tensors raises instead of silently running something else. The choice for each
(op, device type) is logged once, with its reason, on the `engine` logger.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("torch", "cpp", "cuda", "triton")

log = logging.getLogger("engine")
_state = threading.local()
_logged: set[tuple[str, str, str]] = set()


def _forced() -> str | None:
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("ENGINE_BACKEND", "").strip().lower()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"ENGINE_BACKEND={env!r} is not one of {BACKENDS} (or 'auto')")
        return env
    return None


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force `name` for every op called inside the block (per thread). `"auto"` restores the default."""
    name = name.lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend {name!r} is not one of {BACKENDS} (or 'auto')")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name if name != "auto" else None)
    try:
        yield
    finally:
        stack.pop()


def _usable(name: str, device_type: str) -> tuple[bool, str]:
    """Whether backend `name` can run tensors on `device_type`, and why not."""
    from engine import _extension, _triton

    if name == "torch":
        return True, "the PyTorch reference runs everywhere"
    if name == "cpp":
        if device_type != "cpu":
            return False, f"the cpp backend runs CPU tensors only, got {device_type}"
        ok, why = _extension.status()
        return ok, why
    if name == "cuda":
        if device_type != "cuda":
            return False, f"the cuda backend runs CUDA tensors only, got {device_type}"
        if not _extension.status()[0]:
            return False, _extension.status()[1]
        if not _extension.has_cuda_kernels():
            return False, "the C++ extension was built without CUDA kernels"
        return True, "CUDA kernels of the C++ extension"
    if name == "triton":
        return _triton.usable_on(device_type)
    raise ValueError(f"unknown backend {name!r}")


def available_backends(device_type: str | None = None) -> list[str]:
    """Backends that can run here: for `device_type` ('cpu'/'cuda'), or for any device if None."""
    types = [device_type] if device_type else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    return [b for b in BACKENDS if any(_usable(b, t)[0] for t in types)]


def select(op: str, device: torch.device) -> str:
    """The backend that runs `op` on tensors of `device`; logs the choice once per (op, device type)."""
    device_type = torch.device(device).type
    forced = _forced()
    if forced is not None:
        ok, why = _usable(forced, device_type)
        if not ok:
            raise RuntimeError(f"engine.ops.{op}: backend {forced!r} was forced but cannot run here: {why}")
        choice, reason = forced, "forced by engine.backend() or ENGINE_BACKEND"
    else:
        order = ("cuda", "triton", "torch") if device_type == "cuda" else ("cpp", "torch")
        skipped = []
        for name in order:
            ok, why = _usable(name, device_type)
            if ok:
                choice, reason = name, why if not skipped else f"{why} ({'; '.join(skipped)})"
                break
            skipped.append(f"{name}: {why}")
    key = (op, device_type, choice)
    if key not in _logged:
        _logged.add(key)
        log.info("engine.ops.%s on %s uses backend %r: %s", op, device_type, choice, reason)
    return choice


@torch._dynamo.assume_constant_result
def select_backend(op: str, device_type: str) -> str:
    """`select` for the ops' public functions: run eagerly even under `torch.compile` (it logs,
    imports and may build the extension, none of which Dynamo can trace); a compiled graph keeps
    the backend it was traced with."""
    return select(op, torch.device(device_type))
