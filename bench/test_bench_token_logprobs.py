"""token_logprobs: forward, forward with entropy, and forward+backward, each backend against the
expressions a user writes in plain PyTorch (the `torch` rows):
- logp: `torch.log_softmax(logits, -1).gather(-1, ids[:, None])`;
- logp+entropy: the same plus `logsumexp(z) - (softmax(z) * z).sum(-1)` (`_plain_with_entropy`).
  Not `engine.reference.token_logprobs`: its NaN-safe entropy (masked entries) costs several more
  [N, V] passes, which would inflate the ratio (3.7 s against 0.43 s without entropy, fwd+bwd).

Bytes the op must move: forward reads logits once (N·V·elem); backward reads them again and
writes the gradient (2·N·V·elem more). Peak extra memory is recorded for forward+backward.
Run: pytest bench/test_bench_token_logprobs.py --benchmark-only
"""
import pytest
import torch

import engine
import engine.ops as ops
from bench.common import liger_or_skip, on_device, timed
from bench.common import peak_extra_bytes as peak_bytes

N, V = 4096, 32000


def _inputs(device, dtype):
    g = on_device(device)
    logits = (torch.randn(N, V, generator=g, device=device) * 2).to(dtype)
    ids = torch.randint(0, V, (N,), generator=g, device=device)
    return logits, ids


def _cases(test):
    """Both benchmarks' cases: fp32 and bf16, logp alone or with entropy (entropy in fp32 only)."""
    test = pytest.mark.parametrize("return_entropy", [False, True], ids=["logp", "logp+entropy"])(test)
    return pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)(test)


def _case_inputs(device, dtype, return_entropy):
    if dtype != torch.float32 and return_entropy:
        pytest.skip("entropy is benchmarked in fp32")
    return _inputs(device, dtype)


def _plain(logits, ids):
    """The expression every RL trainer writes: materializes log_softmax in fp32."""
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, None]).squeeze(-1)


def _plain_with_entropy(logits, ids):
    """The entropy as users write it, `logsumexp(z) - (softmax(z) * z).sum(-1)`, beside `_plain`'s
    logp (NaN where a logit is -inf; the benchmark's logits are finite)."""
    z = logits.float()
    entropy = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    return _plain(logits, ids), entropy


def _forward(backend, return_entropy):
    if backend == "torch":
        return _plain_with_entropy if return_entropy else _plain
    return lambda logits, ids: ops.token_logprobs(logits, ids, return_entropy=return_entropy)


@_cases
def test_token_logprobs_fwd(benchmark, record, bench_backend, device, dtype, return_entropy):
    logits, ids = _case_inputs(device, dtype, return_entropy)
    fwd = _forward(bench_backend, return_entropy)
    with engine.backend(bench_backend), torch.no_grad():
        timed(benchmark, lambda: fwd(logits, ids), device, rounds=7)
    what = "logp+entropy" if return_entropy else "logp"
    record(benchmark, group=f"token_logprobs fwd ({what}) N={N} V={V} {str(dtype)[6:]}", backend=bench_backend,
           bytes=logits.numel() * logits.element_size(), dtype=str(dtype)[6:])


@_cases
def test_token_logprobs_fwd_bwd(benchmark, record, bench_backend, device, dtype, return_entropy):
    logits, ids = _case_inputs(device, dtype, return_entropy)
    x = logits.clone().requires_grad_()
    g = torch.randn(N, device=device)
    fwd = _forward(bench_backend, return_entropy)

    def step():
        x.grad = None
        out = fwd(x, ids)
        loss = (out[0] * g + out[1] * g).sum() if return_entropy else (out * g).sum()
        loss.backward()
        return x.grad

    with engine.backend(bench_backend):
        timed(benchmark, step, device, rounds=5)
        x.grad = None  # measure from a state without last round's gradient
        peak = peak_bytes(step, device)
    what = "logp+entropy" if return_entropy else "logp"
    record(benchmark, group=f"token_logprobs fwd+bwd ({what}) N={N} V={V} {str(dtype)[6:]}", backend=bench_backend,
           bytes=3 * logits.numel() * logits.element_size(), peak_bytes=peak, dtype=str(dtype)[6:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_liger_cross_entropy_fwd_bwd(benchmark, record, device, dtype):
    """The `liger` row of the fwd+bwd (logp) groups: Liger-Kernel's cross entropy (reduction="none",
    i.e. -logp per row) with the same inputs and upstream gradient (CUDA only, where importable)."""
    ce = liger_or_skip(device, "LigerCrossEntropyLoss")(reduction="none")
    logits, ids = _inputs(device, dtype)
    x = logits.clone().requires_grad_()
    g = torch.randn(N, device=device)

    def step():
        x.grad = None
        (-ce(x, ids) * g).sum().backward()
        return x.grad

    timed(benchmark, step, device, rounds=5)
    record(benchmark, group=f"token_logprobs fwd+bwd (logp) N={N} V={V} {str(dtype)[6:]}", backend="liger",
           bytes=3 * logits.numel() * logits.element_size(), dtype=str(dtype)[6:])
