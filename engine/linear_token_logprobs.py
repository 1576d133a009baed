"""`linear_token_logprobs`: token log-probs through the LM head without materializing `[N, V]` logits.

No kernels of its own (hence no csrc/ or triton_kernels/ file, see tests/test_layout.py): it is a
chunked matmul around `token_logprobs`' row kernels, which `engine/kernels.py` returns per backend.
`token_logprobs(hidden @ weight.T + bias, ids)`, computed one chunk of rows at a time: the
chunk's logits (`[chunk, V]`, in the input dtype; the matmul accumulates in fp32) go through
`token_logprobs_fwd`, forward and backward. Backward recomputes each chunk's logits into the same
buffer, turns them into dlogits in place (`token_logprobs_bwd_inplace`), then
`dhidden[chunk] = dlogits @ W`, `dW += dlogits.T @ hidden[chunk]` (one GEMM into an fp32
accumulator), `dbias += dlogits.sum(0)`. Peak extra memory: one chunk buffer plus the gradients.
Where torch has no 16-bit GEMM into fp32 (CPU), a 16-bit backward with N < V runs by blocks of
vocabulary columns instead (`_backward_by_vocab_blocks`): dW is written once per block, and the
fp32 accumulator is dhidden's [N, H], not dW's [V, H].
Nothing in either chunk loop waits for the device: no `.item()`, no branch on a tensor's value;
the id range is checked once before the loop, the +inf / temperature rule once after it.
Contract: `docs/ops.md#linear_token_logprobs`.

What the op costs at the target shape (N=8192 tokens, H=4096, V=151936, bf16, on an H200:
~990 dense bf16 TFLOP/s, 4.8 TB/s):
- FLOPs: one [N, H] x [H, V] matmul is 2·N·H·V = 10.2 TFLOP = 10.3 ms at peak. The op runs four:
  forward logits, the backward's recompute of them, dhidden, dW (41 TFLOP, 41 ms at peak). Three
  (30.9 ms) would need the upstream gradient in the forward, as a fused cross-entropy loss has it;
  this op returns per-token logp/entropy whose upstream gradients arrive only in backward, and
  keeping the [N, V] logits instead (2.5 GB in bf16) is what the op exists to avoid.
- Bytes it must move: W read in forward and backward and dW written (3 x 1.25 GB), hidden read
  twice and dhidden written (3 x 67 MB): ~3.9 GB, 0.8 ms at 4.8 TB/s. The chunked design adds the
  logits' round trips (forward: written by the GEMM, read by the row kernel; backward: written,
  read and rewritten by the row kernel, read by two GEMMs: 7 x N·V·2 B = 17 GB, ~3.6 ms) and, per
  chunk, W re-read by two or three GEMMs and the fp32 dW accumulator read and written (5 GB) inside
  the dW GEMM; with the default ~1664-row chunks (5 chunks) that traffic hides under the GEMMs'
  own compute (their arithmetic intensity stays above twice the H200's ridge of ~206 FLOP/B).
- Lower bound: ~41 ms (compute-bound; memory alone would take ~1 ms). Target: within 1.2x of the
  time of its four matmuls as the GPU measures them; against three (a fused cross-entropy's count)
  that is 1.33x at best, for the reason above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine import _validate, dispatch, kernels, reference
from engine.token_logprobs import empty_row_outputs, upstream

__all__ = ["linear_token_logprobs", "default_chunk_size", "chunk_rows", "ChunkRule", "GPU_RULE", "CPU_RULE"]


@dataclass(frozen=True)
class ChunkRule:
    """How many rows of logits one chunk holds (docs/ops.md#linear_token_logprobs, "Chunk size")."""

    budget_bytes: int  # the most one [chunk, V] logits block may take, counted at 4 bytes (fp32) a logit
    ridge: float  # the device's matmul FLOP/s over its bytes/s: a GEMM below this intensity waits on memory
    headroom: float = 2.0  # aim the dW GEMM at this multiple of the ridge, so its fp32 accumulator traffic hides
    align: int = 64  # rows rounded to a multiple of this (GEMM tiles), when the budget allows that many


# H200: 990 TFLOP/s bf16 / 4.8 TB/s = 206 FLOP/B (H100: 295); 1 GiB of fp32-sized logits is < 1%
# of its memory and at V = 151936 allows 1766 rows.
GPU_RULE = ChunkRule(budget_bytes=2**30, ridge=206.0)
# CPU (AMX bf16 ~2.8 TFLOP/s over ~31 GB/s = 90 FLOP/B); a smaller budget: CPU RAM is shared with
# everything else, and past ~1000 rows the chunk GEMMs are no faster.
CPU_RULE = ChunkRule(budget_bytes=128 * 2**20, ridge=64.0)


def chunk_rows(n_rows: int, hidden_size: int | None, vocab: int, element_size: int, rule: ChunkRule) -> int:
    """Rows per chunk from N, H, V: enough for the dW GEMM to be compute-bound, within the budget.

    Per chunk of c rows, `dW += dlogits.T @ hidden[chunk]` does 2·c·V·H FLOPs and moves the fp32
    accumulator in and out (8·V·H bytes) plus dlogits (e·c·V) and hidden (e·c·H) at e bytes per
    entry: intensity 2c / (8 + e·c/H + e·c/V). Setting it to `headroom · ridge` = I gives
    c = 8·I / (2 − e·I·(1/H + 1/V)) (the forward and dhidden GEMMs, which move no fp32 accumulator,
    are then above I too). When no c reaches I (small H) or H is unknown, the budget decides alone.
    Then: at most `budget_bytes / (4·V)` rows (the budget wins over speed), at most N, and N split
    into equal chunks (8192 rows by 1728 would leave a 1280-row tail: 5 chunks of 1664 instead).
    Pure arithmetic: nothing is allocated.
    """
    if n_rows <= 1:
        return 1
    cap = rule.budget_bytes // (4 * max(1, vocab))
    cap = cap // rule.align * rule.align if cap >= rule.align else max(1, cap)
    target = rule.headroom * rule.ridge
    denom = 2.0 - element_size * target * (1.0 / hidden_size + 1.0 / vocab) if hidden_size else -1.0
    want = math.ceil(8.0 * target / denom / rule.align) * rule.align if denom > 0 else cap
    rows = min(want, cap)
    if rows >= n_rows:
        return n_rows
    balanced = -(-n_rows // -(-n_rows // rows))  # ceil(N / number of chunks)
    if rows >= rule.align:
        balanced = -(-balanced // rule.align) * rule.align  # still <= rows: rows is a multiple of align
    return min(rows, balanced)


def default_chunk_size(
    n_rows: int, vocab: int, dtype: torch.dtype, *, hidden_size: int | None = None, device: str | torch.device = "cpu"
) -> int:
    """Rows per chunk for these sizes on this kind of device (`chunk_rows` with GPU_RULE or CPU_RULE)."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    rule = CPU_RULE if kind == "cpu" else GPU_RULE
    size = torch.empty((), dtype=dtype, device="meta").element_size()
    return chunk_rows(n_rows, hidden_size, vocab, size, rule)


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
        chunk_size: rows of logits alive at once (default: `default_chunk_size`: from N, H, V and
            the device, hundreds to thousands of rows within a memory budget).

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
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(
        n, weight.shape[0], hidden.dtype, hidden_size=H, device=hidden.device
    )
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
    if n > 0 and need_weight and _by_vocab_blocks(hidden, n, V):
        return _backward_by_vocab_blocks(
            hidden, weight, ids, bias, stats, entropy, grad_logp, grad_entropy, temperature, chunk_size,
            kernels.get("token_logprobs_bwd_inplace", backend), need_hidden, need_bias,
        )
    grad_hidden = hidden.new_empty(hidden.shape if need_hidden else (0,))
    # dW/dbias accumulate in fp32 (for fp32 inputs: the output itself), so that summing over chunks
    # does not round to 16 bits each time; cast to the weight's dtype once, at the end
    f32 = dict(dtype=torch.float32, device=weight.device)
    grad_weight = torch.zeros(weight.shape if need_weight else (0,), **f32)
    grad_bias = torch.zeros(V if need_bias else 0, **f32)
    if n == 0 or not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
    bwd_inplace = kernels.get("token_logprobs_bwd_inplace", backend)
    buf = hidden.new_empty((min(chunk_size, n), V))
    add_dw = _dw_accumulator(hidden, weight) if need_weight else None
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
        if need_weight:
            add_dw(grad_weight, dz.t(), h)
        if need_bias:
            grad_bias.add_(dz.sum(0, dtype=torch.float32))
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


def _by_vocab_blocks(hidden, n: int, V: int) -> bool:
    """Whether the backward runs by vocabulary blocks (`_backward_by_vocab_blocks`): 16-bit inputs
    where torch has no GEMM from them into fp32 (CPU), and fewer rows than vocabulary entries, so
    its fp32 [N, H] dhidden accumulator is smaller than the [V, H] one of the row chunks' dW."""
    return hidden.dtype != torch.float32 and n < V and not mixed_addmm_supported(hidden.device, hidden.dtype)


def _backward_by_vocab_blocks(hidden, weight, ids, bias, stats, entropy, grad_logp, grad_entropy, temperature,
                              chunk_size, bwd_inplace, need_hidden, need_bias):
    """The backward for 16-bit inputs without a mixed GEMM (CPU), by blocks of vocabulary columns.

    Row chunks would need dW's sum over chunks in an fp32 [V, H] accumulator (2x the weight) plus
    a [V, H] temporary for each chunk's 16-bit GEMM (1.9 GB at Qwen2.5-VL-3B's head). Here the
    outer loop runs over blocks of c vocabulary rows instead, each with all N rows: the block's
    logits [N, c] are recomputed into one reused buffer, turned into dlogits in place by the same
    row kernel (each dlogit needs only its row's stats, so a block of columns is enough), then
      dW[block] = dlogits.T @ hidden     written once, straight into the output (one rounding,
                                         after the GEMM's fp32 sum over all N rows)
      dhidden  += dlogits @ W[block]     one [N, H] 16-bit GEMM per block, added into fp32
      dbias[block] = sum_rows dlogits    (fp32)
    Each block's dhidden term is rounded once before the fp32 sum: its error is at most half an ulp
    of |dlogits_block| @ |W_block|, and those add up to |dlogits| @ |W|, the scale one rounding of
    the whole product has. The buffer holds as many logits as the forward's chunk (chunk_size rows
    of V), and c + 32 columns a row: column c is a sink, the local id of rows whose id lies outside
    the block (their one-hot term belongs to another block), discarded with the columns past it.
    """
    n, H = hidden.shape
    V = weight.shape[0]
    cols = max(64, min(chunk_size, n) * V // n // 64 * 64)
    blocks = -(-V // cols)
    per_block = -(-V // blocks)  # ceil: equal blocks ...
    cols = min(V, -(-per_block // 64) * 64)  # ... of a multiple of 64 columns
    buf = hidden.new_zeros((n, cols + 32))
    grad_weight = torch.empty_like(weight)
    grad_bias = torch.zeros(V if need_bias else 0, dtype=torch.float32, device=weight.device)
    acc = torch.zeros((n, H) if need_hidden else (0,), dtype=torch.float32, device=hidden.device)
    partial = torch.empty_like(hidden) if need_hidden else None
    ids = ids.long()
    for v0 in range(0, V, cols):
        v1 = min(v0 + cols, V)
        c = v1 - v0
        w = weight[v0:v1]
        z = _chunk_logits(hidden, w, None if bias is None else bias[v0:v1], buf[:, :c])
        local = torch.where((ids >= v0) & (ids < v1), ids - v0, c)  # c: the sink column
        bwd_inplace(logits=buf, ids=local, stats=stats, entropy=entropy, grad_logp=grad_logp, grad_entropy=grad_entropy,
                    temperature=temperature)
        torch.mm(z.t(), hidden, out=grad_weight[v0:v1])
        if need_hidden:
            acc.add_(torch.mm(z, w, out=partial))
        if need_bias:
            grad_bias[v0:v1] = z.sum(0, dtype=torch.float32)
    grad_hidden = acc.to(hidden.dtype) if need_hidden else hidden.new_empty((0,))
    return grad_hidden, grad_weight, grad_bias.to(weight.dtype)


def _dw_accumulator(hidden, weight):
    """`add(acc, a, b)`: acc (fp32) += a @ b for a, b in the input dtype, as cheaply as the device allows.

    fp32 inputs: `addmm_` into the accumulator. bf16/fp16 where torch has the mixed GEMM (CUDA:
    `torch.addmm(..., out_dtype=torch.float32)`, fp32 accumulator in and out): one GEMM, no
    temporary. Elsewhere (CPU, where N >= V; below that `_backward_by_vocab_blocks` runs) one
    chunk's dW goes through a reused [V, H] buffer in the input dtype and is added into fp32.
    """
    if hidden.dtype == torch.float32:
        return lambda acc, a, b: acc.addmm_(a, b)
    if mixed_addmm_supported(hidden.device, hidden.dtype):
        return lambda acc, a, b: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    partial = torch.empty_like(weight)

    def add(acc, a, b):
        acc.add_(torch.mm(a, b, out=partial))

    return add


_MIXED_ADDMM: dict[tuple[str, torch.dtype], bool] = {}


def mixed_addmm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(fp32_acc, a, b, out_dtype=torch.float32, out=fp32_acc)` runs for `dtype`
    a, b on this kind of device AND accumulates: probed once per (device type, dtype) on 2x2 tensors,
    twice into one accumulator, the values compared (one wait for the device, once a process). A
    call that ran but ignored the accumulator, or wrote elsewhere, would leave dW holding the last
    chunk only; it counts as unsupported (the partial-buffer path runs instead)."""
    key = (device.type, dtype)
    if key not in _MIXED_ADDMM:
        try:
            acc = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float32, device=device)
            a = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=dtype, device=device)  # small integers: exact
            b = torch.tensor([[1.0, 0.0], [3.0, 1.0]], dtype=dtype, device=device)  # a @ b = [[7, 2], [3, 1]]
            for _ in range(2):
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _MIXED_ADDMM[key] = acc.tolist() == [[15.0, 6.0], [9.0, 6.0]]
        except (RuntimeError, NotImplementedError, TypeError):
            _MIXED_ADDMM[key] = False
    return _MIXED_ADDMM[key]


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
