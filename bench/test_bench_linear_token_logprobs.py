"""linear_token_logprobs (fused LM head + log-probs + entropy), forward+backward, each backend
against autograd through what a user writes with full logits (the `torch` rows, `_plain`):
`z = F.linear(hidden, weight, bias)`, `log_softmax(z).gather(ids)` and
`logsumexp(z) - (softmax(z) * z).sum(-1)`. Not `engine.reference.linear_token_logprobs`: its
NaN-safe entropy costs several more [N, V] passes and would inflate the ratio.

FLOPs it must do: forward 2·N·H·V, backward 4·N·H·V (dhidden, dweight); the fused backends
also recompute each chunk's logits (2·N·H·V more), which buys the memory. Peak extra memory is
the point: the reference holds several [N, V] fp32 tensors, the fused op one chunk.
Run: pytest bench/test_bench_linear_token_logprobs.py --benchmark-only
"""
import pytest
import torch

import engine
import engine.ops as ops
from bench.common import liger_or_skip, on_device, timed
from bench.common import peak_extra_bytes as peak_bytes

# the second is the production LM head (Qwen2.5-VL: H=4096, V=151936), GPU and bf16 only: its
# floor is four matmuls (2·N·H·V each: forward, the backward's recompute, dhidden, dweight),
# ~41 ms on an H200 at 990 TFLOP/s (engine/linear_token_logprobs.py counts it); `flops` below
# counts the three a full-logits autograd runs, so its fraction of the matmul floor tops out at 0.75.
PRODUCTION = (8192, 4096, 151936)
SHAPES = [(4096, 256, 32000), PRODUCTION]


def _skip_case(device, N, H, V, dtype):
    # (N*H*V > 2**34 skipped the small shape too: 4096*256*32000 is 3.4e10 > 1.7e10)
    if (N, H, V) == PRODUCTION and (device.type == "cpu" or dtype != torch.bfloat16):
        pytest.skip("the production LM-head shape runs on a GPU in bf16 only")


def _plain(hidden, weight, ids, *, bias=None, return_entropy=True):
    """The full-logits expression users write (NaN where a logit is -inf; these logits are finite)."""
    z = torch.nn.functional.linear(hidden, weight, bias).float()
    logp = torch.log_softmax(z, -1).gather(-1, ids[:, None]).squeeze(-1)
    entropy = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    return logp, entropy


def _inputs(device, N, H, V, dtype):
    """hidden [N, H], weight [V, H], bias [V] (leaves in dtype), ids [N], upstream [N], on `device`."""
    g, kw = on_device(device), dict(device=device)
    hidden = torch.randn(N, H, generator=g, **kw).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, **kw) / H**0.5).to(dtype).requires_grad_()
    bias = (torch.randn(V, generator=g, **kw) * 0.1).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=g, **kw)
    up = torch.randn(N, generator=g, **kw)
    return hidden, weight, bias, ids, up


@pytest.mark.parametrize("N,H,V", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_token_logprobs_fwd_bwd(benchmark, record, bench_backend, device, N, H, V, dtype):
    _skip_case(device, N, H, V, dtype)
    hidden, weight, bias, ids, up = _inputs(device, N, H, V, dtype)

    op = _plain if bench_backend == "torch" else ops.linear_token_logprobs

    def step():
        for t in (hidden, weight, bias):
            t.grad = None
        logp, entropy = op(hidden, weight, ids, bias=bias, return_entropy=True)
        (logp * up + entropy * up).sum().backward()
        return hidden.grad, weight.grad, bias.grad

    with engine.backend(bench_backend):
        timed(benchmark, step, device, rounds=3)
        for t in (hidden, weight, bias):
            t.grad = None  # measure from a state without last round's gradients
        peak = peak_bytes(step, device)
    name = str(dtype)[6:]
    record(benchmark, group=f"linear_token_logprobs fwd+bwd (logp+entropy) N={N} H={H} V={V} {name}",
           backend=bench_backend, flops=6 * N * H * V, floor="matmul", peak_bytes=peak, dtype=name)


@pytest.mark.parametrize("N,H,V", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_liger_fused_linear_cross_entropy_fwd_bwd(benchmark, record, device, N, H, V, dtype):
    """The `liger` row of each fwd+bwd group: Liger-Kernel's fused linear cross entropy
    (reduction="none": -logp per row), same inputs (CUDA only, where importable). It computes no
    entropy, so its ratio flatters Liger: our rows do the entropy besides."""
    _skip_case(device, N, H, V, dtype)
    flce = liger_or_skip(device, "LigerFusedLinearCrossEntropyLoss")(reduction="none")
    hidden, weight, bias, ids, up = _inputs(device, N, H, V, dtype)

    def step():
        for t in (hidden, weight, bias):
            t.grad = None
        (-flce(weight, hidden, ids, bias) * up).sum().backward()
        return hidden.grad, weight.grad, bias.grad

    timed(benchmark, step, device, rounds=3)
    name = str(dtype)[6:]
    record(benchmark, group=f"linear_token_logprobs fwd+bwd (logp+entropy) N={N} H={H} V={V} {name}",
           backend="liger", flops=6 * N * H * V, floor="matmul", dtype=name)
