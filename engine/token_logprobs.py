"""`token_logprobs`: log-probability (and entropy) of given tokens under softmax(logits / temperature).

Contract: `docs/ops.md#token_logprobs`. The `torch` backend is `engine.reference.token_logprobs`;
every fast backend runs the kernels `token_logprobs_fwd/_bwd/_bwd_inplace` that `engine/kernels.py`
returns for it (csrc for `cpp`/`cuda`, `triton_kernels/token_logprobs.py` for `triton`), through one custom op,
`engine::token_logprobs` -> `(logp, entropy, stats)`, whose backward is `engine::token_logprobs_backward`.
`stats: [N, 2]` = (row max of z, log sum exp(z - max)): the logsumexp in two parts, so that backward
rounds `z - lse` as `log_softmax` does; it is internal and not differentiable.
"""
from __future__ import annotations

import torch

from engine import _validate, dispatch, kernels, reference

__all__ = ["token_logprobs"]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False):
    """Log-probability of each id under softmax(logits / temperature), and optionally the entropy.

    Args:
        logits: `[..., V]` float32/bfloat16/float16.
        ids: `[...]` int64/int32, the leading shape of `logits`, each in `[0, V)`.
        temperature: positive; `z = logits / temperature`.
        return_entropy: also return `entropy = logsumexp(z) - sum(softmax(z) * z)`.

    Returns:
        `logp: [...]` float32, or `(logp, entropy)` (both `[...]` float32). Both are differentiable
        in `logits`; the gradient has the dtype of `logits`.
    """
    check_args(logits, ids, temperature)
    backend = dispatch.select_backend("token_logprobs", logits.device.type)
    if backend == "torch":
        _validate.check_ids_in_range("ids", ids, logits.shape[-1])  # the kernels check their own
        return reference.token_logprobs(logits, ids, temperature=temperature, return_entropy=return_entropy)
    V = logits.shape[-1]
    logp, entropy, _stats = token_logprobs_op(
        logits.reshape(-1, V), ids.reshape(-1), float(temperature), bool(return_entropy), backend
    )
    logp = logp.view(ids.shape)
    return (logp, entropy.view(ids.shape)) if return_entropy else logp


def check_args(logits, ids, temperature) -> None:
    """ValueError naming the argument for anything the kernels do not take (id range: kernels)."""
    _validate.check_float("logits", logits, min_ndim=1)
    _validate.check_index("ids", ids)
    _validate.check_same_device(logits=logits, ids=ids)
    _validate.check_shape("ids", ids, tuple(logits.shape[:-1]), "the leading dims of logits")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary (last) dim, got shape {tuple(logits.shape)}")
    _validate.check_positive("temperature", temperature)


def upstream(grad, n: int):
    """An upstream grad as fp32, or None when autograd gave none (or an empty one)."""
    if grad is None or grad.numel() != n or n == 0:
        return None
    return grad.float()


# ---- the custom op and its autograd ----


@torch.library.custom_op("engine::token_logprobs", mutates_args=())
def token_logprobs_op(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float, return_entropy: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V], ids [N] -> (logp [N], entropy [N] or [0], stats [N, 2]) fp32 on a fast backend."""
    if backend != "cpp":
        # the CUDA and Triton kernels cannot raise from the device (the C++ kernel checks ids itself)
        _validate.check_ids_in_range("ids", ids, logits.shape[-1])
    fwd = kernels.get("token_logprobs_fwd", backend)
    logp, entropy, stats = fwd(logits=logits, ids=ids, temperature=temperature, return_entropy=return_entropy)
    # one rule for every backend: a +inf logit, or a temperature that overflows z, raises ValueError
    _validate.check_rows_finite_max(stats[:, 0], lambda r: logits[r], temperature)
    return logp, entropy, stats


def empty_row_outputs(like: torch.Tensor, n: int, return_entropy: bool):
    """Uninitialized fp32 (logp [n], entropy [n] or [0], stats [n, 2]) on the device of `like`: the
    forward's outputs, as the fakes of token_logprobs and linear_token_logprobs describe them."""
    f32 = dict(dtype=torch.float32)
    return like.new_empty((n,), **f32), like.new_empty((n if return_entropy else 0,), **f32), like.new_empty((n, 2), **f32)


@token_logprobs_op.register_fake
def _(logits, ids, temperature, return_entropy, backend):
    return empty_row_outputs(logits, logits.shape[0], return_entropy)


@torch.library.custom_op("engine::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    logits: torch.Tensor,
    ids: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    backend: str,
) -> torch.Tensor:
    """grad_logits [N, V] (logits dtype) from the upstream grads of logp and entropy [N]."""
    bwd = kernels.get("token_logprobs_bwd", backend)
    return bwd(logits=logits, ids=ids, stats=stats, entropy=entropy, grad_logp=grad_logp, grad_entropy=grad_entropy,
               temperature=temperature)


@token_logprobs_backward_op.register_fake
def _(logits, ids, stats, entropy, grad_logp, grad_entropy, temperature, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, ids, temperature, return_entropy, backend = inputs
    _logp, entropy, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(logits, ids, stats, entropy)
    ctx.temperature, ctx.return_entropy, ctx.backend = temperature, return_entropy, backend


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    logits, ids, stats, entropy = ctx.saved_tensors
    n = logits.shape[0]
    grad_entropy = upstream(grad_entropy, n) if ctx.return_entropy else None
    grad_logits = token_logprobs_backward_op(
        logits, ids, stats, entropy, upstream(grad_logp, n), grad_entropy, ctx.temperature, ctx.backend
    )
    return grad_logits, None, None, None, None


token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)
