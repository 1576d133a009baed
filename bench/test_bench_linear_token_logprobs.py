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
from bench.common import peak_extra_bytes as peak_bytes

SHAPES = [(4096, 256, 32000)]


def _plain(hidden, weight, ids, *, bias=None, return_entropy=True):
    """The full-logits expression users write (NaN where a logit is -inf; these logits are finite)."""
    z = torch.nn.functional.linear(hidden, weight, bias).float()
    logp = torch.log_softmax(z, -1).gather(-1, ids[:, None]).squeeze(-1)
    entropy = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("N,H,V", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_token_logprobs_fwd_bwd(benchmark, record, bench_backend, device, N, H, V, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=dtype).requires_grad_()
    bias = (torch.randn(V, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=g).to(device)
    up = torch.randn(N, generator=g).to(device)

    op = _plain if bench_backend == "torch" else ops.linear_token_logprobs

    def step():
        for t in (hidden, weight, bias):
            t.grad = None
        logp, entropy = op(hidden, weight, ids, bias=bias, return_entropy=True)
        (logp * up + entropy * up).sum().backward()
        return hidden.grad, weight.grad, bias.grad

    with engine.backend(bench_backend):
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
        for t in (hidden, weight, bias):
            t.grad = None  # measure from a state without last round's gradients
        peak = peak_bytes(step, device)
    name = str(dtype)[6:]
    record(benchmark, group=f"linear_token_logprobs fwd+bwd (logp+entropy) N={N} H={H} V={V} {name}",
           backend=bench_backend, flops=6 * N * H * V, floor="matmul", peak_bytes=peak, dtype=name)
