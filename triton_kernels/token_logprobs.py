"""Triton kernels of `token_logprobs`: one program per row, looping over the vocabulary in blocks.

Forward keeps an online (max m, S = sum e^(z-m), T = sum e^(z-m) (z-m)) per lane of the block (one
exp per entry, no reduction inside the V loop) and merges the lanes once: lse = m + log S,
entropy = log S - T/S; it returns stats [N, 2] = (m, log S). Backward recomputes
p = e^((z - m) - log S) block by block:
dlogits = (g_logp (onehot - p) + g_ent p (lse - entropy - z)) / temperature.
Divisions (by the temperature, and the entropy's t / S) round to nearest (tl.math.div_rn), as torch's and the CUDA
kernel's __fdiv_rn do: Triton's `/` on fp32 is the approximate div.full.f32 (up to 2 ulp).
A NaN in a row makes that row's outputs and gradients NaN (counted explicitly: `tl.max` does not
promise to propagate NaN); rows with -inf entries (masked vocabulary) stay finite.
"""
import torch
import triton
import triton.language as tl

from triton_kernels import _runtime as _triton

__all__ = ["token_logprobs_fwd", "token_logprobs_bwd", "token_logprobs_bwd_inplace"]

# The vocabulary size bounds each row's loop. On a GPU it is a runtime argument (one compile for
# every V). The interpreter (Triton 3.6 with numpy >= 2.4) cannot turn a runtime scalar into a
# `range` bound, so there V is a constexpr, which costs nothing without a compiler. The name must
# be `constexpr`: the interpreter re-parses the kernel's source with postponed annotations and
# compares the annotation's text; Triton's compiler evaluates it (None: a runtime argument).
constexpr = tl.constexpr if _triton.interpreting() else None


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, ids_ptr, logp_ptr, stats_ptr, entropy_ptr,
    V: constexpr, stride_row, temperature,
    RETURN_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    # Each lane keeps its own online (m, s, t) over the columns it sees (start + lane of every
    # block): the loop is elementwise, one exp per entry and no cross-lane reduction; the lanes
    # merge once after the loop.
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    t = tl.zeros([BLOCK], tl.float32)
    nans = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z = tl.math.div_rn(tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32), temperature)
        is_nan = z != z
        nans += is_nan.to(tl.int32)
        z = tl.where(is_nan, float("-inf"), z)  # counted above; kept out of the sums
        up = z > m  # a new lane max: the lane's sums are rescaled to it
        # d = min - max <= 0: z - m, or m - z for a new max; -inf where z is -inf (masked: adds
        # nothing) or the lane was empty (its sums are 0 and stay 0). hi is 0 when both are -inf,
        # so -inf - -inf (NaN) is never formed.
        hi = tl.maximum(m, z)
        d = tl.minimum(m, z) - tl.where(hi == float("-inf"), 0.0, hi)
        e = tl.exp(d)
        ed = e * tl.where(e > 0.0, d, 0.0)  # e * d, with 0 (not 0 * -inf) where e is 0
        if RETURN_ENTROPY:
            t = tl.where(up, e * t + ed * s, t + ed)
        s = tl.where(up, e * s + 1.0, s + e)  # a new max adds e^0 = 1
        m = hi
    # merge the lanes: shift each lane's sums from its max to the row's
    row_m = tl.max(m, axis=0)
    safe_m = tl.where(row_m == float("-inf"), 0.0, row_m)
    sh = m - safe_m  # <= 0; -inf for a lane that saw nothing finite
    sc = tl.exp(sh)
    if RETURN_ENTROPY:  # t + sh * s only where the lane has weight (sh is -inf for an empty lane)
        t = tl.sum(sc * (t + tl.where(sc > 0.0, sh, 0.0) * s), axis=0)
    s = tl.sum(s * sc, axis=0)
    n_nan = tl.sum(nans, axis=0)
    m = row_m
    nan = float("nan")
    m = tl.where(n_nan > 0, nan, m)
    log_s = tl.log(s)
    tok = tl.load(ids_ptr + row).to(tl.int64)
    ok = (tok >= 0) & (tok < V)  # the launcher checked; never read outside the row regardless
    z_tok = tl.math.div_rn(tl.load(base + tok, mask=ok, other=nan).to(tl.float32), temperature)
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    # (z - m) - log S, rounded as log_softmax rounds it
    tl.store(logp_ptr + row, (z_tok - m) - log_s)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(n_nan > 0, nan, log_s - tl.math.div_rn(t, s)))


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr, grad_ptr, ids_ptr, stats_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    V: constexpr, stride_row, stride_grad_row, temperature,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    gbase = grad_ptr + row * stride_grad_row
    m = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    g_logp = 0.0
    g_ent = 0.0
    ent = 0.0
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row)
        ent = tl.load(entropy_ptr + row)
    # with d = z - m: dz = p (coef - g_ent d) + [j == id] g_logp, coef = -g_logp + g_ent (log S - entropy)
    coef = -g_logp + g_ent * (log_s - ent)
    # no finite max (a NaN row, or no finite logit): the whole row's gradient is NaN, as in the reference
    bad = (m != m) | (m == float("inf")) | (m == float("-inf")) | (log_s != log_s) | (coef != coef)
    poison = tl.where(bad, float("nan"), 0.0)
    tok = tl.load(ids_ptr + row).to(tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        d = tl.math.div_rn(tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32), temperature) - m
        p = tl.exp(d - log_s)
        # masked entries (p = 0, d = -inf) get 0; d is zeroed first so no 0 * inf is ever formed
        dz = p * (coef - g_ent * tl.where(p > 0.0, d, 0.0))
        dz = tl.where(offs == tok, dz + g_logp, dz)
        tl.store(gbase + offs, tl.math.div_rn(dz + poison, temperature).to(grad_ptr.dtype.element_ty), mask=mask)


def _block(V: int, block: int | None) -> int:
    if block is not None:
        return block
    # the interpreter runs a block as one numpy op: bigger is faster there. On a GPU 4096 columns
    # per iteration: with the forward's four per-lane accumulators that is 32 registers a thread at
    # 16 warps (V = 151936: 38 iterations, the last 9% full), so 2-3 blocks fit an SM.
    return min(triton.next_power_of_2(V), 16384 if _triton.interpreting() else 4096)


def _warps(block: int, V: int) -> int:
    # a long row (an LM vocabulary, ~150k) is streamed by one program: 16 warps = 512 threads keep
    # enough 16-byte loads in flight (8 bf16 each: 4096 / 512 = 8 columns a thread per iteration)
    if block >= 4096 and V >= 65536:
        return 16
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _rows(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def token_logprobs_fwd(
    *, logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits: [N, V], ids: [N] in [0, V) -> (logp [N], entropy [N] or [0], stats [N, 2]) fp32."""
    logits = _rows(logits)
    N, V = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp, stats = torch.empty(N, **f32), torch.empty(N, 2, **f32)
    entropy = torch.empty(N if return_entropy else 0, **f32)
    if N == 0:
        return logp, entropy, stats
    BLOCK = _block(V, block)
    _token_logprobs_fwd_kernel[(N,)](
        logits, ids.contiguous(), logp, stats, entropy if return_entropy else logp,
        V, logits.stride(0), float(temperature),
        RETURN_ENTROPY=return_entropy, BLOCK=BLOCK, num_warps=_warps(BLOCK, V),
    )
    return logp, entropy, stats


def _bwd_launcher(inplace: bool):
    """The launcher of `token_logprobs_bwd` (inplace False) or `token_logprobs_bwd_inplace`: one
    schema (csrc/ops.cpp), so one keyword list; they differ only in where grad_logits goes."""

    def launch(
        *,
        logits: torch.Tensor,
        ids: torch.Tensor,
        stats: torch.Tensor,
        entropy: torch.Tensor,
        grad_logp: torch.Tensor | None = None,
        grad_entropy: torch.Tensor | None = None,
        temperature: float = 1.0,
        block: int | None = None,
    ):
        if inplace:
            if logits.dim() != 2 or logits.stride(-1) != 1:
                raise ValueError(
                    f"logits must be [N, V] with a contiguous last dim to be overwritten, got strides {logits.stride()}"
                )
            _launch_bwd(logits, logits, ids, stats, entropy, grad_logp, grad_entropy, temperature, block)
            return None
        logits = _rows(logits)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        return _launch_bwd(logits, grad, ids, stats, entropy, grad_logp, grad_entropy, temperature, block)

    launch.__name__ = launch.__qualname__ = "token_logprobs_bwd_inplace" if inplace else "token_logprobs_bwd"
    launch.__doc__ = (
        "The same, overwriting `logits` [N, V] with grad_logits (each block is read before it is written) -> None."
        if inplace
        else "grad_logits [N, V] in the logits dtype (a new tensor)."
    )
    return launch


token_logprobs_bwd = _bwd_launcher(inplace=False)
token_logprobs_bwd_inplace = _bwd_launcher(inplace=True)


def _launch_bwd(logits, grad, ids, stats, entropy, grad_logp, grad_entropy, temperature, block) -> torch.Tensor:
    N, V = logits.shape
    if N == 0:
        return grad
    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    grad_logp, grad_entropy = f32(grad_logp), f32(grad_entropy)
    stats = stats.contiguous()
    BLOCK = _block(V, block)
    _token_logprobs_bwd_kernel[(N,)](
        logits, grad, ids.contiguous(), stats,
        entropy.contiguous() if grad_entropy is not None else stats,
        grad_logp if grad_logp is not None else stats,
        grad_entropy if grad_entropy is not None else stats,
        V, logits.stride(0), grad.stride(0), float(temperature),
        HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        BLOCK=BLOCK, num_warps=_warps(BLOCK, V),
    )
    return grad
