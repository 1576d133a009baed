"""`linear_token_logprobs`: token log-probs through the LM head without materializing `[N, V]` logits.

No kernels of its own (hence no csrc/ or triton_kernels/ file, see tests/test_layout.py): it is a
chunked matmul around `token_logprobs`' row kernels, which `engine/kernels.py` returns per backend.
`token_logprobs(hidden @ weight.T + bias, ids)`, computed one chunk of rows at a time: the
chunk's logits (`[chunk, V]`, in the input dtype; the matmul accumulates in fp32) go through
`token_logprobs_fwd`, forward and backward. Backward recomputes each chunk's logits into the same
buffer, turns them into dlogits in place (`token_logprobs_bwd_inplace`), then
`dhidden[chunk] = dlogits @ W`, `dW += dlogits.T @ hidden[chunk]`, `dbias += dlogits.sum(0)`.
Peak extra memory: one chunk buffer plus the gradients themselves.
Contract: `docs/ops.md#linear_token_logprobs`.
"""
from __future__ import annotations

import torch

from engine import _validate, dispatch, kernels, reference
from engine.token_logprobs import empty_row_outputs, upstream

__all__ = ["linear_token_logprobs", "default_chunk_size"]

# Bytes of one chunk's logits: 32 MiB keeps the buffer at a few % of the full logits at LM-head
# sizes while each chunk's matmul (e.g. [256, H] x [H, 32000]) still runs at full GEMM speed.
CHUNK_BYTES = 32 * 2**20


def default_chunk_size(n_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: ~CHUNK_BYTES of logits, a multiple of 16 (GEMM tiles), at least 16, at most n_rows."""
    rows = CHUNK_BYTES // max(1, vocab * torch.empty((), dtype=dtype).element_size())
    rows = max(16, rows // 16 * 16)
    return max(1, min(rows, n_rows))


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
):
    """Log-probs (and entropy) of `ids` under softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: `[..., H]` float32/bfloat16/float16.
        weight: `[V, H]`, the dtype of `hidden`.
        ids: `[...]` int64/int32, the leading shape of `hidden`, each in `[0, V)`.
        bias: optional `[V]`, the dtype of `hidden`.
        temperature: positive.
        return_entropy: also return the entropy of each row's distribution.
        chunk_size: rows of logits alive at once (default: `default_chunk_size`, ~32 MiB of logits).

    Returns:
        `logp: [...]` float32, or `(logp, entropy)`. Differentiable in `hidden`, `weight`, `bias`.
    """
    check_args(hidden, weight, ids, bias, temperature, chunk_size)
    backend = dispatch.select_backend("linear_token_logprobs", hidden.device.type)
    if backend == "torch":
        _validate.check_ids_in_range("ids", ids, weight.shape[0])  # the kernels check their own
        return reference.linear_token_logprobs(
            hidden, weight, ids, bias=bias, temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size
        )
    H = hidden.shape[-1]
    n = ids.numel()  # (hidden.reshape(-1, H) is ambiguous for H = 0: reshape to (n, H))
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(n, weight.shape[0], hidden.dtype)
    logp, entropy, _stats = linear_token_logprobs_op(
        hidden.reshape(n, H), weight, ids.reshape(-1), bias, float(temperature), bool(return_entropy), chunk, backend
    )
    logp = logp.view(ids.shape)
    return (logp, entropy.view(ids.shape)) if return_entropy else logp


def check_args(hidden, weight, ids, bias, temperature, chunk_size) -> None:
    _validate.check_float("hidden", hidden, min_ndim=1)
    _validate.check_float("weight", weight, ndim=2)
    _validate.check_index("ids", ids)
    if bias is not None:
        _validate.check_float("bias", bias, ndim=1)
    _validate.check_same_device(hidden=hidden, weight=weight, ids=ids, bias=bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise ValueError(f"{name} must have the dtype of hidden ({hidden.dtype}), got {t.dtype}")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden must have last dim {H} (weight is [V, H] = {tuple(weight.shape)}), got shape {tuple(hidden.shape)}")
    if V == 0:
        raise ValueError(f"weight must have at least one row (the vocabulary), got shape {tuple(weight.shape)}")
    _validate.check_shape("ids", ids, tuple(hidden.shape[:-1]), "the leading dims of hidden")
    if bias is not None:
        _validate.check_shape("bias", bias, (V,), "one entry per row of weight")
    _validate.check_positive("temperature", temperature)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _chunk_logits(hidden, weight, bias, out):
    """out = hidden @ weight.T (+ bias), written into the reused chunk buffer."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


# ---- the custom op and its autograd ----


@torch.library.custom_op("engine::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    return_entropy: bool,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H], ids [N] -> (logp [N], entropy [N] or [0], stats [N, 2]) fp32."""
    n, V = hidden.shape[0], weight.shape[0]
    logp, entropy, stats = empty_row_outputs(hidden, n, return_entropy)
    if n == 0:
        return logp, entropy, stats
    # once for every backend, before any chunk runs (the CUDA and Triton kernels cannot raise)
    _validate.check_ids_in_range("ids", ids, V)
    fwd = kernels.get("token_logprobs_fwd", backend)
    buf = hidden.new_empty((min(chunk_size, n), V))
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        z = _chunk_logits(hidden[s:e], weight, bias, buf[: e - s])
        lp, ent, st = fwd(logits=z, ids=ids[s:e], temperature=temperature, return_entropy=return_entropy)
        logp[s:e], stats[s:e] = lp, st
        if return_entropy:
            entropy[s:e] = ent
    # as token_logprobs: a +inf logit, or a temperature that overflows z, raises ValueError
    _validate.check_rows_finite_max(stats[:, 0], lambda r: _row_logits(hidden, weight, bias, r), temperature)
    return logp, entropy, stats


def _row_logits(hidden, weight, bias, r):
    """Row r's logits (the error path of the +inf check only)."""
    return torch.nn.functional.linear(hidden[r : r + 1], weight, bias)[0]


@linear_token_logprobs_op.register_fake
def _(hidden, weight, ids, bias, temperature, return_entropy, chunk_size, backend):
    return empty_row_outputs(hidden, hidden.shape[0], return_entropy)


@torch.library.custom_op("engine::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    chunk_size: int,
    backend: str,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in the input dtype; a gradient that
    is not needed (or a bias that is None) comes back as an empty [0] tensor and costs no matmul."""
    n, V = hidden.shape[0], weight.shape[0]
    need_bias = need_bias and bias is not None
    grad_hidden = hidden.new_empty(hidden.shape if need_hidden else (0,))
    # fp32 inputs accumulate dW/dbias in the output itself; bf16/fp16 in an fp32 buffer, so that
    # summing over chunks does not round to 16 bits each time
    exact = hidden.dtype == torch.float32
    f32 = dict(dtype=torch.float32, device=weight.device)
    grad_weight = torch.zeros(weight.shape if need_weight else (0,), **f32)
    grad_bias = torch.zeros(V if need_bias else 0, **f32)
    if n == 0 or not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
    bwd_inplace = kernels.get("token_logprobs_bwd_inplace", backend)
    buf = hidden.new_empty((min(chunk_size, n), V))
    partial = torch.empty_like(weight) if need_weight and not exact else None  # one chunk's dW, then fp32
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        h = hidden[s:e]
        dz = _chunk_logits(h, weight, bias, buf[: e - s])
        g = lambda t: None if t is None else t[s:e]  # noqa: E731
        # the chunk's logits become its dlogits in the same buffer
        bwd_inplace(logits=dz, ids=ids[s:e], stats=stats[s:e], entropy=entropy[s:e] if entropy.numel() else entropy,
                    grad_logp=g(grad_logp), grad_entropy=g(grad_entropy), temperature=temperature)
        if need_hidden:
            torch.mm(dz, weight, out=grad_hidden[s:e])
        if need_weight and exact:
            grad_weight.addmm_(dz.t(), h)
        elif need_weight:
            grad_weight.add_(torch.mm(dz.t(), h, out=partial))
        if need_bias:
            grad_bias.add_(dz.sum(0, dtype=torch.float32))
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@linear_token_logprobs_backward_op.register_fake
def _(hidden, weight, ids, bias, stats, entropy, grad_logp, grad_entropy, temperature, chunk_size, backend,
      need_hidden=True, need_weight=True, need_bias=True):
    V = weight.shape[0]
    return (
        hidden.new_empty(hidden.shape if need_hidden else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        weight.new_empty((V if need_bias and bias is not None else 0,)),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, ids, bias, temperature, return_entropy, chunk_size, backend = inputs
    _logp, entropy, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(hidden, weight, ids, bias, stats, entropy)
    ctx.temperature, ctx.return_entropy, ctx.chunk_size, ctx.backend = temperature, return_entropy, chunk_size, backend


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    hidden, weight, ids, bias, stats, entropy = ctx.saved_tensors
    n = hidden.shape[0]
    grad_entropy = upstream(grad_entropy, n) if ctx.return_entropy else None
    need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
    grad_hidden, grad_weight, grad_bias = linear_token_logprobs_backward_op(
        hidden, weight, ids, bias, stats, entropy, upstream(grad_logp, n), grad_entropy,
        ctx.temperature, ctx.chunk_size, ctx.backend, need_hidden, need_weight, need_bias,
    )
    keep = lambda grad, needed: grad if needed else None  # noqa: E731
    return (keep(grad_hidden, need_hidden), keep(grad_weight, need_weight), None,
            keep(grad_bias, need_bias and bias is not None), None, None, None, None)


linear_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)
