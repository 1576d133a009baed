"""engine.ops.token_logprobs on every backend runnable here: the backend AND `engine.reference`
against an fp64 truth written out in this file (tests/tolerance.py says why both are bounded).

Bounds (`k x eps x scale`, zmax = max(1, max |logits / temperature|) over finite entries):
- logp, fp32: z = logits / T rounds once (eps |z|), the row max and log S each add ~eps |z|, and
  log S sums V terms (~log2 V eps, 16 at V = 50257): k = 16, scale zmax.
- entropy, fp32: sum p z is formed from p = exp(z - lse), whose relative error is ~2 eps zmax
  (the error of z - lse), times |z| <= zmax: scale zmax^2, k = 8 (the reference measures ~2.2).
- gradients, in the input dtype: bf16/fp16 round the fp32 result once (half an ulp of the largest
  entry), k = 2; fp32 inherits p's relative error ~eps |z|: scale max|grad| x zmax, k = 32
  (measured over 120 draws at V = 50257: up to 5.6 for the C++ kernel, up to 21.7 for the
  reference, whose autograd goes through log_softmax and p * z separately; k = 8 made the
  reference fail about one run in twenty).
"""
import math

import pytest
import torch

import engine
import engine.ops as ops
from engine import reference
from tests.tolerance import assert_matches_fp64

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEG_INF = float("-inf")
F32 = torch.float32
K_LOGP, K_ENTROPY = 16, 8
K_GRAD = {torch.float32: 32, torch.bfloat16: 2, torch.float16: 2}


def truth64(logits, ids, temperature):
    """(logp, entropy, zmax) in fp64 and a closure giving d(sum(g_logp logp + g_ent entropy))/dlogits
    in fp64: log_softmax, gather, entropy = logsumexp(z) - sum p z, from the same inputs."""
    x = logits.detach().double().requires_grad_()
    z = x / temperature
    logsm = torch.log_softmax(z, -1)
    logp = logsm.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    p = logsm.exp()
    # a masked entry (z = -inf, p = 0) contributes 0 (zeroing z, not the product, keeps autograd finite)
    entropy = torch.logsumexp(z, -1) - (p * torch.where(p > 0, z, torch.zeros_like(z))).sum(-1)
    finite = z.detach()[torch.isfinite(z.detach())]
    zmax = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0

    def grad(g_logp, g_ent):
        (gx,) = torch.autograd.grad((logp * g_logp.double()).nansum() + (entropy * g_ent.double()).nansum(), x, retain_graph=True)
        return gx

    return logp.detach(), entropy.detach(), zmax, grad


def grad_scale(truth: torch.Tensor, zmax: float, dtype: torch.dtype) -> float:
    """max |grad| (at least 1), times zmax for fp32 (p's relative error ~eps |z|, see the top)."""
    finite = truth[torch.isfinite(truth)]
    top = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return top * (zmax if dtype == torch.float32 else 1.0)


def run(backend, logits, ids, temperature, g_logp, g_ent):
    """(logp, entropy, grad_logits) from `backend` with upstream grads into both outputs."""
    x = logits.detach().clone().requires_grad_()
    with engine.backend(backend):
        logp, entropy = ops.token_logprobs(x, ids, temperature=temperature, return_entropy=True)
    (logp * g_logp + entropy * g_ent).sum().backward()
    return logp, entropy, x.grad


def check_against_truth(backend, logits, ids, temperature):
    """The backend and the reference, forward and backward (random upstream grads), against fp64."""
    g_logp, g_ent = torch.randn(ids.shape, device=ids.device), torch.randn(ids.shape, device=ids.device)
    logp, entropy, grad = run(backend, logits, ids, temperature, g_logp, g_ent)
    t_logp, t_entropy, t_grad = run("torch", logits, ids, temperature, g_logp, g_ent)
    r_logp, r_entropy, zmax, r_grad = truth64(logits, ids, temperature)
    r_grad = r_grad(g_logp, g_ent)
    assert logp.dtype == entropy.dtype == torch.float32 and grad.dtype == logits.dtype
    assert logp.shape == entropy.shape == ids.shape and grad.shape == logits.shape
    assert_matches_fp64("logp", logp, r_logp, torch_out=t_logp, dtype=F32, k=K_LOGP, scale=zmax)
    assert_matches_fp64("entropy", entropy, r_entropy, torch_out=t_entropy, dtype=F32, k=K_ENTROPY, scale=zmax**2)
    assert_matches_fp64("grad_logits", grad, r_grad, torch_out=t_grad, dtype=logits.dtype, k=K_GRAD[logits.dtype],
                        scale=grad_scale(r_grad, zmax, logits.dtype))


def _skip_interpreter(backend, dtype=torch.float32, V=0):
    if backend == "triton" and engine._triton.interpreting():
        if dtype != torch.float32:
            pytest.skip("the Triton interpreter is tested in fp32 only")
        if V > 4096:
            pytest.skip("the Triton interpreter is tested on small vocabularies")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# one token; vocabularies that are no multiple of any block size; 3-D leading shape; a real LM vocabulary
@pytest.mark.parametrize("shape", [(1, 7), (5, 3001), (2, 3, 1000), (3, 50257)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_fp64(backend_name, device, dtype, shape, temperature):
    _skip_interpreter(backend_name, dtype, shape[-1])
    logits = (torch.randn(shape, device=device) * 4).to(dtype)
    ids = torch.randint(0, shape[-1], shape[:-1], device=device)
    check_against_truth(backend_name, logits, ids, temperature)


def test_logp_only_and_int32_ids(backend_name, device):
    logits = torch.randn(9, 2500, device=device) * 3
    ids = torch.randint(0, 2500, (9,), device=device, dtype=torch.int32)
    g = torch.randn(9, device=device)
    x = logits.clone().requires_grad_()
    with engine.backend(backend_name):
        logp = ops.token_logprobs(x, ids, temperature=1.3)
    assert isinstance(logp, torch.Tensor) and logp.shape == (9,)
    (logp * g).sum().backward()
    r_logp, _, zmax, r_grad = truth64(logits, ids, 1.3)
    r_grad = r_grad(g, torch.zeros_like(g))
    t_logp, _, t_grad = run("torch", logits, ids, 1.3, g, torch.zeros_like(g))
    assert_matches_fp64("logp", logp, r_logp, torch_out=t_logp, dtype=F32, k=K_LOGP, scale=zmax)
    assert_matches_fp64("grad_logits", x.grad, r_grad, torch_out=t_grad, dtype=F32, k=K_GRAD[F32],
                        scale=grad_scale(r_grad, zmax, F32))


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches(backend_name, device, n):
    logits = torch.randn(n, 33, device=device)
    ids = torch.randint(0, 33, (n,), device=device)
    check_against_truth(backend_name, logits, ids, 1.0)


def test_masked_vocabulary(backend_name, device):
    """-inf entries (masked vocab): finite logp/entropy, zero gradient at masked entries."""
    V = 2053
    logits = torch.randn(5, V, device=device) * 2
    logits[0, ::2] = NEG_INF
    logits[1, 100:] = NEG_INF  # masked tail spanning whole blocks
    logits[2, :1500] = NEG_INF  # masked head: the running max starts at -inf
    logits[3, torch.randperm(V)[: V - 1]] = NEG_INF  # one live entry: entropy 0
    ids = torch.tensor([1, 5, 1600, 0, 7], device=device)
    ids[3] = int(torch.isfinite(logits[3]).nonzero()[0])
    g_logp, g_ent = torch.randn(5, device=device), torch.randn(5, device=device)
    logp, entropy, grad = run(backend_name, logits, ids, 0.9, g_logp, g_ent)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    assert (grad[torch.isinf(logits)] == 0).all()
    assert abs(float(entropy[3].detach())) < 1e-6
    check_against_truth(backend_name, logits, ids, 0.9)


def test_nan_row_stays_confined(backend_name, device):
    logits = torch.randn(4, 1500, device=device)
    logits[2, 777] = float("nan")
    ids = torch.randint(0, 1500, (4,), device=device)
    g_logp, g_ent = torch.randn(4, device=device), torch.randn(4, device=device)
    logp, entropy, grad = run(backend_name, logits, ids, 1.0, g_logp, g_ent)
    assert torch.isnan(logp[2]) and torch.isnan(entropy[2]) and torch.isnan(grad[2]).all()
    keep = torch.tensor([0, 1, 3], device=device)
    assert torch.isfinite(logp[keep]).all() and torch.isfinite(entropy[keep]).all() and torch.isfinite(grad[keep]).all()
    r_logp, r_entropy, zmax, r_grad = truth64(logits[keep], ids[keep], 1.0)
    r_grad = r_grad(g_logp[keep], g_ent[keep])
    assert_matches_fp64("logp", logp[keep], r_logp, dtype=F32, k=K_LOGP, scale=zmax)
    assert_matches_fp64("entropy", entropy[keep], r_entropy, dtype=F32, k=K_ENTROPY, scale=zmax**2)
    assert_matches_fp64("grad_logits", grad[keep], r_grad, dtype=F32, k=K_GRAD[F32], scale=grad_scale(r_grad, zmax, F32))


def test_non_contiguous_logits(backend_name, device):
    base = torch.randn(6, 2 * 1200, device=device)
    logits = base[:, ::2]  # row stride 2400, element stride 2
    ids = torch.randint(0, 1200, (6,), device=device)
    check_against_truth(backend_name, logits, ids, 1.0)


BAD_INPUTS = [
    ("ids", lambda x, i: (x, torch.full_like(i, x.shape[-1]))),  # id == V
    ("ids", lambda x, i: (x, torch.full_like(i, -1))),
    ("ids", lambda x, i: (x, i[:-1])),  # shape mismatch
    ("ids", lambda x, i: (x, i.float())),
    ("logits", lambda x, i: (x.long(), i)),
    ("logits", lambda x, i: (x[..., :0], i)),  # empty vocabulary
    ("logits", lambda x, i: ("not a tensor", i)),
    ("ids", lambda x, i: (x, i.to("meta"))),  # another device
]


@pytest.mark.parametrize("name,make", BAD_INPUTS)
def test_bad_input_raises_value_error(backend_name, device, name, make):
    logits, ids = torch.randn(3, 11, device=device), torch.randint(0, 11, (3,), device=device)
    bad_logits, bad_ids = make(logits, ids)
    with engine.backend(backend_name), pytest.raises(ValueError, match=name):
        ops.token_logprobs(bad_logits, bad_ids)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(backend_name, device, temperature):
    with engine.backend(backend_name), pytest.raises(ValueError, match="temperature"):
        ops.token_logprobs(torch.randn(2, 5, device=device), torch.zeros(2, dtype=torch.long, device=device), temperature=temperature)


# ---- closed forms, one per way the maths can go wrong; each checks the backend and the reference ----


@pytest.mark.parametrize("V", [1, 2, 7, 3001])
def test_entropy_of_known_distributions(backend_name, device, V):
    """Equal logits (any offset c): entropy = log V exactly, logp = -log V; one live entry: 0.
    A wrong entropy formula (e.g. a lost logsumexp term: -c here) fails row 0/1 at once."""
    c = 5.0
    logits = torch.full((3, V), c, device=device)
    logits[1] = -c
    logits[2, 1:] = NEG_INF  # only entry 0 is live: a point mass
    ids = torch.zeros(3, dtype=torch.long, device=device)
    want_logp = torch.tensor([-torch.log(torch.tensor(float(V))).item()] * 2 + [0.0], dtype=torch.float64)
    want_ent = -want_logp
    for who, be in (("backend", backend_name), ("reference", "torch")):
        with engine.backend(be):
            logp, entropy = ops.token_logprobs(logits, ids, temperature=0.6, return_entropy=True)
        # |c / T| <= 8.4 rounds to ~1e-6; log V is exact to fp32's eps
        torch.testing.assert_close(logp.double().cpu(), want_logp, rtol=0, atol=4e-6, msg=f"{who}: logp")
        torch.testing.assert_close(entropy.double().cpu(), want_ent, rtol=0, atol=4e-6, msg=f"{who}: entropy")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_temperature_divides_the_logits_once(backend_name, device, temperature):
    """Two tokens with logits (0, d): p(1) = sigmoid(d / T), entropy = the binary entropy, and
    d logp(1) / d logits = (onehot - p) / T. Applying T twice (d / T^2) or forgetting the 1/T of
    the gradient fails here for every T != 1."""
    d = torch.linspace(-6, 6, 13, dtype=torch.float64)
    logits64 = torch.stack([torch.zeros_like(d), d], -1)
    ids = torch.ones(13, dtype=torch.long, device=device)
    p1 = torch.sigmoid(d / temperature)
    want_logp = torch.log(p1)
    want_ent = -(p1 * torch.log(p1) + (1 - p1) * torch.log1p(-p1))
    want_grad = torch.stack([-(1 - p1), 1 - p1], -1) / temperature  # (onehot - p) / T for onehot = id 1
    for who, be in (("backend", backend_name), ("reference", "torch")):
        x = logits64.float().to(device).requires_grad_()
        with engine.backend(be):
            logp, entropy = ops.token_logprobs(x, ids, temperature=temperature, return_entropy=True)
        logp.sum().backward()
        # |d / T| <= 12: fp32 rounding keeps every entry within ~1e-6 of the closed form
        torch.testing.assert_close(logp.double().cpu(), want_logp, rtol=0, atol=1e-5, msg=f"{who}: logp")
        torch.testing.assert_close(entropy.double().cpu(), want_ent, rtol=0, atol=1e-5, msg=f"{who}: entropy")
        torch.testing.assert_close(x.grad.double().cpu(), want_grad, rtol=0, atol=1e-5, msg=f"{who}: grad_logits")


def test_reference_is_the_plain_expression(device):
    logits, ids = torch.randn(4, 50, device=device), torch.randint(0, 50, (4,), device=device)
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(reference.token_logprobs(logits, ids), expected)


@pytest.mark.parametrize("return_entropy", [False, True])
def test_opcheck(backend_name, device, return_entropy):
    if backend_name == "torch":
        pytest.skip("the torch backend is the plain reference, no custom op")
    from engine.token_logprobs import token_logprobs_backward_op, token_logprobs_op

    logits = torch.randn(5, 300, device=device, requires_grad=True)
    ids = torch.randint(0, 300, (5,), device=device)
    torch.library.opcheck(token_logprobs_op, (logits, ids, 0.8, return_entropy, backend_name))
    _, entropy, stats = token_logprobs_op(logits.detach(), ids, 0.8, True, backend_name)
    g = torch.randn(5, device=device)
    torch.library.opcheck(token_logprobs_backward_op, (logits.detach(), ids, stats, entropy, g, g, 0.8, backend_name))


def test_torch_compile_fullgraph(backend_name, device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="inductor" if backend_name == "cpp" else "aot_eager")
    def f(logits, ids):
        logp, entropy = ops.token_logprobs(logits, ids, temperature=0.9, return_entropy=True)
        return (logp + 0.1 * entropy).sum()

    logits = torch.randn(2, 3, 257, device=device)
    ids = torch.randint(0, 257, (2, 3), device=device)
    x, x_ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    with engine.backend(backend_name):
        out = f(x, ids)
        out.backward()
        logp, entropy = ops.token_logprobs(x_ref, ids, temperature=0.9, return_entropy=True)
        ref = (logp + 0.1 * entropy).sum()
        ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


_CAPABILITY_SCRIPT = """
import sys, torch, engine, engine.ops as ops
torch.manual_seed(0)
x = (torch.randn(5, 2500) * 3).to(getattr(torch, sys.argv[2])).requires_grad_()
x.data[1, ::3] = float("-inf")
ids = torch.randint(0, 2500, (5,))
with engine.backend("cpp"):
    logp, ent = ops.token_logprobs(x, ids, temperature=0.7, return_entropy=True)
(logp.sum() + 0.5 * ent.sum()).backward()
torch.save((logp.detach(), ent.detach(), x.grad), sys.argv[1])
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_capability_builds_agree(tmp_path, device, dtype):
    """The AVX-512, AVX2 and portable builds of the row kernels (ATEN_CPU_CAPABILITY caps the
    choice once per process, hence subprocesses) give the same results."""
    import os
    import subprocess
    import sys

    if device.type != "cpu" or "cpp" not in engine.available_backends("cpu"):
        pytest.skip("needs the cpp backend on CPU tensors")
    outs = {}
    for cap in ("avx512", "avx2", "default"):
        path = tmp_path / f"{cap}.pt"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT, str(path), dtype], env=env, check=True, timeout=300)
        outs[cap] = torch.load(path)
    # fp32 sums differ in the last bits between builds; a bf16 gradient may round one ulp apart
    grad_rtol = 1e-5 if dtype == "float32" else 2**-7
    for cap in ("avx2", "default"):
        for name, a, b in zip(("logp", "entropy", "grad"), outs[cap], outs["avx512"]):
            rtol = grad_rtol if name == "grad" else 1e-5
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-5, msg=f"{cap} vs avx512: {name}")


# ---- extreme values: one semantics for every backend (docs/ops.md#token_logprobs, "Extreme values") ----


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_posinf_logit_raises(backend_name, device, dtype, temperature):
    """+inf is not a valid logit: ValueError naming logits and the row (every backend alike)."""
    logits = torch.randn(3, 40, device=device).to(dtype)
    logits[2, 7] = float("inf")
    ids = torch.zeros(3, dtype=torch.long, device=device)
    with engine.backend(backend_name), pytest.raises(ValueError, match=r"logits holds \+inf in row 2"):
        ops.token_logprobs(logits, ids, temperature=temperature, return_entropy=True)
    with pytest.raises(ValueError, match=r"logits holds \+inf in row 2"):
        reference.token_logprobs(logits, ids, temperature=temperature)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_temperature_that_overflows_z_raises(backend_name, device, sign):
    """logits / temperature overflowing fp32 (+inf, or a row all -inf) is refused, naming temperature."""
    logits = torch.tensor([[1.0, 2.0, 3.0], [sign * 1e10, sign * 2e10, sign * 3e10]], device=device)
    ids = torch.zeros(2, dtype=torch.long, device=device)
    with engine.backend(backend_name), pytest.raises(ValueError, match=r"temperature 1e-30 is too small.*row 1"):
        ops.token_logprobs(logits, ids, temperature=1e-30)


def test_tiny_temperature_that_keeps_z_finite(backend_name, device):
    """A tiny temperature is fine while z stays finite: the argmax limit (logp 0 at the max, entropy 0)."""
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.25]], device=device)
    ids = torch.tensor([2, 0], device=device)
    with engine.backend(backend_name):
        logp, entropy = ops.token_logprobs(logits, ids, temperature=1e-30, return_entropy=True)
    assert torch.equal(logp.cpu(), torch.zeros(2)) and torch.equal(entropy.cpu().abs(), torch.zeros(2))


def test_entropy_without_cancellation(backend_name, device):
    """[1e30, 1e30, 3]: p = (1/2, 1/2, 0), entropy log 2 (lse - sum p z would round it to 0)."""
    logits = torch.tensor([[1e30, 1e30, 3.0], [1e30, -1e30, 1e30], [5e37, 5e37, 5e37]], device=device)
    ids = torch.tensor([0, 1, 2], device=device)
    x = logits.clone().requires_grad_()
    with engine.backend(backend_name):
        logp, entropy = ops.token_logprobs(x, ids, return_entropy=True)
    logp.sum().backward()
    log2, log3 = math.log(2), math.log(3)
    torch.testing.assert_close(logp.detach().cpu(), torch.tensor([-log2, -2e30, -log3]))
    torch.testing.assert_close(entropy.detach().cpu(), torch.tensor([log2, log2, log3]))
    # d logp / d logits = onehot(id) - p
    expect = torch.tensor([[0.5, -0.5, 0.0], [-0.5, 1.0, -0.5], [-1 / 3, -1 / 3, 2 / 3]])
    torch.testing.assert_close(x.grad.cpu(), expect)
    r_logp, r_ent = reference.token_logprobs(logits, ids, return_entropy=True)
    torch.testing.assert_close(r_ent.cpu(), torch.tensor([log2, log2, log3]))
