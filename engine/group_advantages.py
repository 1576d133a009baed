"""`group_advantages`: GRPO's group-normalized advantages, one per response.

    adv = engine.ops.group_advantages(rewards, group_size=8)      # rewards: [B] -> adv: [B] fp32

Contract: docs/ops.md#group_advantages. The `torch` backend is `engine.reference.group_advantages`;
the others run the kernel `group_advantages_fwd` through `engine.kernels` (csrc/cpu, csrc/cuda,
triton_kernels/group_advantages.py) inside the custom op `engine::group_advantages`, so that
`torch.compile` traces it. Advantages are constants (EasyR1 computes them under no_grad): no autograd.
"""
from __future__ import annotations

import math
import operator

import torch

from engine import dispatch, kernels, reference
from engine._validate import FLOAT_DTYPES, check_finite, check_tensor
from engine.grpo_options import ADVANTAGE_SCALES

__all__ = ["group_advantages"]

_REWARD_DTYPES = FLOAT_DTYPES + (torch.float64,)  # cast to fp32 for the kernels: B values, cheap


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """rewards: [B] float, B a multiple of `group_size` -> adv: [B] fp32 (a constant: no gradient).

    adv = (r - mean_g) / (std_g + eps), std unbiased over each group of `group_size` consecutive rows
    (a group of one has std 0); scale="batch" divides by the std of all B rewards, "none" only
    subtracts the group mean (Dr.GRPO). A group of equal rewards gives exactly 0. B may be 0.
    """
    check_args(rewards, group_size, scale, eps)
    group_size = operator.index(group_size)
    # one semantics for every backend: a NaN/inf reward (or one beyond fp32's range) is refused
    check_finite("rewards", rewards.detach().to(torch.float32), "(in fp32, the kernels' precision)")
    backend = dispatch.select_backend("group_advantages", rewards.device.type)
    if backend == "torch":
        return reference.group_advantages(rewards, group_size, scale=scale, eps=eps)
    return _group_advantages_op(rewards.detach().to(torch.float32).contiguous(), group_size, scale, float(eps), backend)


def check_args(rewards, group_size, scale, eps) -> None:
    """ValueError naming the argument for anything the op does not take."""
    check_tensor("rewards", rewards, dtypes=_REWARD_DTYPES, ndim=1)
    try:  # ints and integer scalars (numpy, 0-dim tensors); not floats or bools
        if isinstance(group_size, bool):
            raise TypeError
        group_size = operator.index(group_size)
    except TypeError:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}") from None
    if group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the batch: rewards has {rewards.shape[0]} rows")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")


@torch.library.custom_op("engine::group_advantages", mutates_args=())
def _group_advantages_op(rewards: torch.Tensor, group_size: int, scale: str, eps: float, backend: str) -> torch.Tensor:
    """rewards [B] fp32 contiguous -> adv [B] fp32, on `backend` (cpp, cuda or triton)."""
    return kernels.get("group_advantages_fwd", backend)(rewards=rewards, group_size=group_size, scale=scale, eps=eps)


@_group_advantages_op.register_fake
def _(rewards, group_size, scale, eps, backend):
    return rewards.new_empty(rewards.shape, dtype=torch.float32)
