"""The one table from (kernel, backend) to the function that runs it.

Every fast op is a pair of kernels, `<op>_fwd` and `<op>_bwd` (some have a third, e.g. an in-place
backward). Their schemas live in `csrc/ops.cpp`; `cpp` and `cuda` run `torch.ops.engine.<kernel>`
(the dispatcher picks the CPU or CUDA implementation from the tensors' device), `triton` runs the
launcher of the same name in `triton_kernels/<module>.py`. The launchers take the schema's
argument names as keywords, so an op's wrapper calls every backend the same way:

    out = kernels.get("grpo_loss_fwd", backend)(logp=logp, advantages=adv, ...)

Adding an op adds its kernels to `TRITON_MODULE` below (docs/adding-an-op.md); nothing else in
the engine switches on backend names.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

# kernel name -> the triton_kernels module that defines a launcher of that name (None: no Triton
# version; that backend then raises for this kernel).
TRITON_MODULE: dict[str, str | None] = {
    "token_logprobs_fwd": "triton_kernels.token_logprobs",
    "token_logprobs_bwd": "triton_kernels.token_logprobs",
    "token_logprobs_bwd_inplace": "triton_kernels.token_logprobs",
    "group_advantages_fwd": "triton_kernels.group_advantages",
    "grpo_loss_fwd": "triton_kernels.grpo_loss",
    "grpo_loss_bwd": "triton_kernels.grpo_loss",
    "patch_embed_fwd": "triton_kernels.patch_embed",
    "patch_embed_bwd": "triton_kernels.patch_embed",
    "patchify_fwd": "triton_kernels.patchify",
    "patchify_embed_fwd": "triton_kernels.patchify_embed",
    "patchify_embed_bwd": "triton_kernels.patchify_embed",
}

FAST_BACKENDS = ("cpp", "cuda", "triton")


def get(kernel: str, backend: str) -> Callable[..., Any]:
    """The function that runs `kernel` on `backend`; call it with the schema's keyword names.

    Raises ValueError for an unknown kernel or backend ("torch" has no kernels: the op's wrapper
    calls `engine.reference`), RuntimeError when the backend's code is not available.
    """
    if kernel not in TRITON_MODULE:
        raise ValueError(f"unknown kernel {kernel!r}; kernels: {', '.join(TRITON_MODULE)}")
    if backend in ("cpp", "cuda"):
        from engine import _extension

        _extension.require()
        return getattr(torch.ops.engine, kernel)
    if backend == "triton":
        module = TRITON_MODULE[kernel]
        if module is None:
            raise RuntimeError(f"kernel {kernel!r} has no Triton version")
        return getattr(importlib.import_module(module), kernel)
    raise ValueError(f"backend {backend!r} runs no kernels; fast backends: {FAST_BACKENDS}")
