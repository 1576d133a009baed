"""engine.ops.linear_token_logprobs (fused LM head) on every backend runnable here: the backend AND
`engine.reference` against an fp64 truth written out in this file; gradients for hidden, weight and
bias compared by name.

Bounds (`k x eps(input dtype) x scale`): both paths round each logit to the input dtype (the chunk
buffer; `F.linear` for the reference) after an fp32 sum over H, so a logit carries an error of
~eps times its conditioning zc = max(1, max (|h| @ |W|.T + |b|) / T), and p = exp(z - lse) a
relative error of ~eps x zmax (zmax = max(1, max |z|)).
- logp: scale zc; k = 8 (the rounding of z, the fp32 sum over H and log S; measured <= 2.7).
- entropy: sum p z, scale zc x zmax (p's error times |z|); k = 8 (measured <= 1.9).
- gradients: dlogits (error ~eps zmax |dlogits|) summed through a matmul: scale zmax times the
  matmul's conditioning (|dlogits| @ |W| for hidden, |dlogits|.T @ |h| for weight, sum |dlogits|
  for bias). fp32: k = 32, the fp32 sums run over V = 50257 terms (measured <= 13); bf16/fp16:
  k = 2, the last rounding to the input dtype dominates (measured <= 0.14).
"""
import pytest
import torch

import engine
import engine.ops as ops
import engine.linear_token_logprobs as ltl
from engine.linear_token_logprobs import default_chunk_size
from tests.tolerance import assert_matches_fp64

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
K_LOGP, K_ENTROPY = 8, 8
K_GRAD = {torch.float32: 32, torch.bfloat16: 2, torch.float16: 2}


def make(shape, H, V, dtype, device, *, bias=True):
    hidden = (torch.randn(*shape, H, device=device)).to(dtype)
    weight = (torch.randn(V, H, device=device) / H**0.5 * 3).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    ids = torch.randint(0, V, shape, device=device)
    return hidden, weight, b, ids


def run(backend, hidden, weight, bias, ids, g_logp, g_ent, **kw):
    """(logp, entropy, {name: grad}) with upstream grads into both outputs."""
    leaves = {"hidden": hidden, "weight": weight, "bias": bias}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items() if v is not None}
    with engine.backend(backend):
        logp, entropy = ops.linear_token_logprobs(
            leaves["hidden"], leaves["weight"], ids, bias=leaves.get("bias"), return_entropy=True, **kw
        )
    (logp * g_logp + entropy * g_ent).sum().backward()
    return logp, entropy, {k: v.grad for k, v in leaves.items()}


def truth64(hidden, weight, bias, ids, g_logp, g_ent, temperature):
    """(logp, entropy, {name: grad}, {name: scale}) in fp64 from the same inputs: linear, log_softmax,
    gather, entropy = logsumexp(z) - sum p z; scales as the module docstring derives them."""
    leaves = {"hidden": hidden, "weight": weight, "bias": bias}
    leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items() if v is not None}
    logits = torch.nn.functional.linear(leaves["hidden"], leaves["weight"], leaves.get("bias"))
    logits.retain_grad()
    z = logits / temperature
    logsm = torch.log_softmax(z, -1)
    logp = logsm.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    p = logsm.exp()
    entropy = torch.logsumexp(z, -1) - (p * z).sum(-1)
    (logp * g_logp.double() + entropy * g_ent.double()).sum().backward()
    with torch.no_grad():
        V, H = weight.shape
        ah, aw = hidden.detach().double().abs().reshape(-1, H), weight.detach().double().abs()
        ab = None if bias is None else bias.detach().double().abs()
        dz = logits.grad.abs().reshape(-1, V)
        top = lambda t: max(1.0, float(t.max())) if t.numel() else 1.0  # noqa: E731
        zc, zmax = top(torch.nn.functional.linear(ah, aw, ab) / temperature), top(z.abs())
        scales = {"logp": zc, "entropy": zc * zmax,
                  "hidden": zmax * top(dz @ aw), "weight": zmax * top(dz.T @ ah), "bias": zmax * top(dz.sum(0))}
    return logp.detach(), entropy.detach(), {k: v.grad for k, v in leaves.items()}, scales


def check(backend, hidden, weight, bias, ids, *, temperature=1.0, chunk_size=None):
    g_logp, g_ent = torch.randn(ids.shape, device=ids.device), torch.randn(ids.shape, device=ids.device)
    kw = dict(temperature=temperature, chunk_size=chunk_size)
    logp, entropy, grads = run(backend, hidden, weight, bias, ids, g_logp, g_ent, **kw)
    t_logp, t_entropy, t_grads = run("torch", hidden, weight, bias, ids, g_logp, g_ent, **kw)
    r_logp, r_entropy, r_grads, scale = truth64(hidden, weight, bias, ids, g_logp, g_ent, temperature)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == entropy.shape == ids.shape
    dt = hidden.dtype
    assert_matches_fp64("logp", logp, r_logp, torch_out=t_logp, dtype=dt, k=K_LOGP, scale=scale["logp"])
    assert_matches_fp64("entropy", entropy, r_entropy, torch_out=t_entropy, dtype=dt, k=K_ENTROPY, scale=scale["entropy"])
    assert set(grads) == set(r_grads)
    for name in grads:
        assert grads[name].dtype == hidden.dtype, name
        assert_matches_fp64(f"grad_{name}", grads[name], r_grads[name], torch_out=t_grads[name], dtype=dt,
                            k=K_GRAD[dt], scale=scale[name])


def check_grads(named, hidden, weight, bias, ids, g_logp, g_ent):
    """Bound the grads in `named` ({name: grad}) and the reference's against fp64 (fp32 inputs)."""
    _, _, t_grads = run("torch", hidden, weight, bias, ids, g_logp, g_ent)
    _, _, r_grads, scale = truth64(hidden, weight, bias, ids, g_logp, g_ent, 1.0)
    for name, grad in named.items():
        assert_matches_fp64(f"grad_{name}", grad, r_grads[name], torch_out=t_grads[name], dtype=torch.float32,
                            k=K_GRAD[torch.float32], scale=scale[name])


def _skip_interpreter(backend, dtype=torch.float32):
    if backend == "triton" and engine._triton.interpreting() and dtype != torch.float32:
        pytest.skip("the Triton interpreter is tested in fp32 only")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_size", [None, 4, 7])
def test_matches_fp64(backend_name, device, dtype, chunk_size):
    _skip_interpreter(backend_name, dtype)
    hidden, weight, bias, ids = make((2, 9), 48, 1031, dtype, device)  # 18 rows: chunks of 4 and 7 leave tails
    check(backend_name, hidden, weight, bias, ids, temperature=0.8, chunk_size=chunk_size)


def test_no_bias_and_large_vocab(backend_name, device):
    _skip_interpreter(backend_name)
    V = 50257 if backend_name != "triton" else 3001
    # 37 rows (chunks of 8 leave a tail of 5) through a real LM vocabulary: the fp32 sums over V
    # that K_GRAD[float32] is sized for
    hidden, weight, _, ids = make((37,), 64, V, torch.float32, device, bias=False)
    check(backend_name, hidden, weight, None, ids, chunk_size=8)


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches(backend_name, device, n):
    hidden, weight, bias, ids = make((n,), 16, 37, torch.float32, device)
    check(backend_name, hidden, weight, bias, ids)


def test_logp_only_and_frozen_weight(backend_name, device):
    hidden, weight, bias, ids = make((6,), 24, 301, torch.float32, device)
    h = hidden.clone().requires_grad_()
    g = torch.randn(6, device=device)
    with engine.backend(backend_name):
        logp = ops.linear_token_logprobs(h, weight, ids, bias=bias, chunk_size=4)
    assert isinstance(logp, torch.Tensor) and logp.shape == (6,)
    (logp * g).sum().backward()
    check_grads({"hidden": h.grad}, hidden, weight, bias, ids, g, torch.zeros_like(g))


def test_frozen_hidden_only_weight_and_bias_grads(backend_name, device):
    hidden, weight, bias, ids = make((6,), 24, 301, torch.float32, device)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    g_logp, g_ent = torch.randn(6, device=device), torch.randn(6, device=device)
    with engine.backend(backend_name):
        logp, entropy = ops.linear_token_logprobs(hidden, w, ids, bias=b, return_entropy=True, chunk_size=4)
    (logp * g_logp + entropy * g_ent).sum().backward()
    assert hidden.grad is None
    check_grads({"weight": w.grad, "bias": b.grad}, hidden, weight, bias, ids, g_logp, g_ent)


def test_same_as_token_logprobs_of_the_logits(backend_name, device):
    hidden, weight, bias, ids = make((3, 4), 20, 257, torch.float32, device)
    with engine.backend(backend_name):
        fused = ops.linear_token_logprobs(hidden, weight, ids, bias=bias, temperature=1.5, chunk_size=5)
        plain = ops.token_logprobs(hidden @ weight.T + bias, ids, temperature=1.5)
    torch.testing.assert_close(fused, plain, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 16, 64])  # 37 rows: tails of 5; one chunk bigger than N
def test_large_odd_vocab_chunk_boundaries(backend_name, device, dtype, chunk_size):
    """V = 50021: odd, prime, more than one Triton block (16384 in the interpreter), not a multiple
    of any vector width; logp, entropy and all three gradients against fp64."""
    _skip_interpreter(backend_name, dtype)
    hidden, weight, bias, ids = make((37,), 24, 50021, dtype, device)
    check(backend_name, hidden, weight, bias, ids, temperature=1.3, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_token(backend_name, device, dtype):
    _skip_interpreter(backend_name, dtype)
    hidden, weight, bias, ids = make((1,), 40, 4099, dtype, device)
    check(backend_name, hidden, weight, bias, ids, temperature=0.9)


def test_chunk_rule_at_the_production_shape():
    """N=8192 H=4096 V=151936 bf16 (pure arithmetic): hundreds+ rows on a GPU, a few equal chunks,
    the [chunk, V] fp32 block within the budget (the old rule: 96 rows, 86 chunks)."""
    N, H, V = 8192, 4096, 151936
    assert default_chunk_size(N, V, torch.bfloat16) >= 128  # without H or a device: the CPU budget alone
    rows = ltl.chunk_rows(N, H, V, 2, ltl.GPU_RULE)
    assert 512 <= rows < N and rows % ltl.GPU_RULE.align == 0
    assert rows * V * 4 <= ltl.GPU_RULE.budget_bytes
    chunks = -(-N // rows)
    assert chunks <= 8 and N - (chunks - 1) * rows >= rows // 2  # no sliver of a last chunk
    assert default_chunk_size(N, V, torch.bfloat16, hidden_size=H, device="cuda:0") == rows
    cpu = default_chunk_size(N, V, torch.bfloat16, hidden_size=H, device="cpu")
    assert 128 <= cpu <= rows and cpu * V * 4 <= ltl.CPU_RULE.budget_bytes


@pytest.mark.parametrize("rule", ["GPU_RULE", "CPU_RULE"])
def test_chunk_rule_respects_the_budget(rule):
    rule = getattr(ltl, rule)
    for N in (1, 2, 37, 8192, 10**6):
        for H in (None, 0, 16, 256, 4096, 16384):
            for V in (1, 37, 32000, 151936, 10**7):
                for e in (2, 4):
                    rows = ltl.chunk_rows(N, H, V, e, rule)
                    assert 1 <= rows <= N, (N, H, V, e, rows)
                    assert rows == 1 or rows * V * 4 <= rule.budget_bytes, (N, H, V, e, rows)
    # wider hidden states need fewer rows for the same GEMM intensity; never fewer than the tiles
    assert ltl.chunk_rows(10**6, 16384, 151936, 2, rule) <= ltl.chunk_rows(10**6, 1024, 151936, 2, rule)


SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def _count_host_syncs(monkeypatch, fn) -> int:
    """Calls of the Tensor methods that wait for the device (on a GPU) while fn runs."""
    n = [0]
    for name in SYNCS:
        def counted(self, *a, _orig=getattr(torch.Tensor, name), **k):
            n[0] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return n[0]


def test_no_host_sync_per_chunk(backend_name, device, monkeypatch):
    """Forward + backward in 24 chunks make no more host syncs than in one (the id range before the
    loop, the +inf rule after it, a constant number)."""
    if backend_name == "torch":
        pytest.skip("the torch backend is the plain reference: no chunks")
    hidden, weight, bias, ids = make((24,), 16, 97, torch.float32, device)
    g = torch.randn(24, device=device)

    def fwd_bwd(chunk):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with engine.backend(backend_name):
            logp, entropy = ops.linear_token_logprobs(leaves[0], leaves[1], ids, bias=leaves[2], return_entropy=True,
                                                      chunk_size=chunk)
            (logp * g + entropy * g).sum().backward()

    fwd_bwd(1)  # warm caches (kernel compiles, the mixed-GEMM probe)
    one, many = (_count_host_syncs(monkeypatch, lambda c=c: fwd_bwd(c)) for c in (24, 1))
    assert many == one <= 6, (one, many)


@pytest.mark.parametrize("chunk_size", [5, 64])
def test_16bit_dweight_is_one_gemm_into_fp32_without_temporary(backend_name, device, monkeypatch, chunk_size):
    """Where torch has the mixed GEMM (CUDA: addmm with out_dtype=float32; emulated here), each
    chunk's dW is one addmm into the fp32 accumulator: no [V, H] temporary in the input dtype."""
    if backend_name == "torch":
        pytest.skip("the torch backend is the plain reference: no chunks")
    _skip_interpreter(backend_name, torch.bfloat16)
    hidden, weight, bias, ids = make((13,), 24, 301, torch.bfloat16, device)
    mixed, temporaries = [], []
    real_addmm, real_mm = torch.addmm, torch.mm

    def addmm(inp, a, b, *args, out_dtype=None, **kw):
        if out_dtype is None:
            return real_addmm(inp, a, b, *args, **kw)
        assert out_dtype == torch.float32 and kw["out"] is inp and inp.dtype == torch.float32
        mixed.append(a.shape[1])
        return inp.addmm_(a.float(), b.float())  # what the fused GEMM computes (fp32 products and sums)

    def mm(a, b, *args, **kw):
        if kw.get("out") is not None and tuple(kw["out"].shape) == tuple(weight.shape):
            temporaries.append(kw["out"].dtype)
        return real_mm(a, b, *args, **kw)

    monkeypatch.setattr(torch, "addmm", addmm)
    monkeypatch.setattr(torch, "mm", mm)
    probed = getattr(ltl, "_MIXED_ADDMM", {})  # (a version without the probe must fail the asserts, not here)
    monkeypatch.setitem(probed, (device.type, torch.bfloat16), True)
    check(backend_name, hidden, weight, bias, ids, chunk_size=chunk_size)
    assert mixed == [min(chunk_size, 13 - s) for s in range(0, 13, chunk_size)] and temporaries == []


@pytest.mark.parametrize("behaviour", ["accumulates", "ignores the accumulator", "raises"])
def test_mixed_gemm_probe_checks_the_accumulated_value(device, monkeypatch, behaviour):
    """The probe for addmm(acc, a, b, out_dtype=fp32, out=acc) trusts what it computes, not that it
    runs: a GEMM that ran but dropped acc would leave dW holding the last chunk only."""
    real_addmm = torch.addmm

    def addmm(inp, a, b, *args, out_dtype=None, out=None, **kw):
        if out_dtype is None:
            return real_addmm(inp, a, b, *args, out=out, **kw)
        if behaviour == "raises":
            raise RuntimeError("addmm: out_dtype is not supported here")
        product = torch.mm(a.float(), b.float())
        return out.copy_(inp + product if behaviour == "accumulates" else product)

    monkeypatch.setattr(torch, "addmm", addmm)
    monkeypatch.setattr(ltl, "_MIXED_ADDMM", {})
    assert ltl.mixed_addmm_supported(device, torch.bfloat16) is (behaviour == "accumulates")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_16bit_backward_without_mixed_gemm_has_no_vh_accumulator(backend_name, device, monkeypatch, dtype, chunk_size):
    """Where torch has no 16-bit GEMM into fp32 (CPU) and N < V, the backward runs by vocabulary
    blocks: no fp32 [V, H] accumulator and no [V, H] temporary (each block's dW is written once into
    the output), and all three gradients still match fp64. chunk_size=3 with 29 rows and V = 997: blocks
    of 128 columns, the last one shorter; rows whose id is in another block (the sink column)."""
    if backend_name == "torch":
        pytest.skip("the torch backend is the plain reference: no chunks")
    _skip_interpreter(backend_name, dtype)
    hidden, weight, bias, ids = make((29,), 24, 997, dtype, device)
    probed = getattr(ltl, "_MIXED_ADDMM", {})
    monkeypatch.setitem(probed, (device.type, dtype), False)
    big = []
    real_zeros, real_mm = torch.zeros, torch.mm

    def zeros(*shape, **kw):
        t = real_zeros(*shape, **kw)
        if t.numel() >= weight.numel():
            big.append(("zeros", tuple(t.shape), t.dtype))
        return t

    def mm(a, b, *args, **kw):
        if kw.get("out") is not None and kw["out"].numel() >= weight.numel():
            big.append(("mm out", tuple(kw["out"].shape), kw["out"].dtype))
        return real_mm(a, b, *args, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)
    monkeypatch.setattr(torch, "mm", mm)
    check(backend_name, hidden, weight, bias, ids, temperature=1.1, chunk_size=chunk_size)
    assert big == []


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_16bit_backward_with_more_rows_than_vocab(backend_name, device, monkeypatch, chunk_size):
    """N >= V (40 rows, V = 37) without the mixed GEMM: the row chunks' path (dW through a [V, H]
    temporary into fp32), against fp64."""
    _skip_interpreter(backend_name, torch.bfloat16)
    monkeypatch.setitem(getattr(ltl, "_MIXED_ADDMM", {}), (device.type, torch.bfloat16), False)
    hidden, weight, bias, ids = make((40,), 16, 37, torch.bfloat16, device)
    check(backend_name, hidden, weight, bias, ids, chunk_size=chunk_size)


BAD_INPUTS = [
    ("ids", lambda h, w, b, i: (h, w, b, torch.full_like(i, w.shape[0]))),  # id == V
    ("ids", lambda h, w, b, i: (h, w, b, torch.full_like(i, -1))),
    ("ids", lambda h, w, b, i: (h, w, b, i[:-1])),
    ("ids", lambda h, w, b, i: (h, w, b, i.float())),
    ("hidden", lambda h, w, b, i: (h[:, :-1], w, b, i)),  # H mismatch
    ("hidden", lambda h, w, b, i: (h.long(), w, b, i)),
    ("weight", lambda h, w, b, i: (h, w[None], b, i)),
    ("weight", lambda h, w, b, i: (h, w.double(), b, i)),
    ("bias", lambda h, w, b, i: (h, w, b[:-1], i)),
    ("bias", lambda h, w, b, i: (h, w, b.half(), i)),
    ("weight", lambda h, w, b, i: (h, w.to("meta"), b, i)),  # another device
]


@pytest.mark.parametrize("name,make_bad", BAD_INPUTS)
def test_bad_input_raises_value_error(backend_name, device, name, make_bad):
    hidden, weight, bias, ids = make((3,), 8, 11, torch.float32, device)
    h, w, b, i = make_bad(hidden, weight, bias, ids)
    with engine.backend(backend_name), pytest.raises(ValueError, match=name):
        ops.linear_token_logprobs(h, w, i, bias=b)


@pytest.mark.parametrize("kw,name", [(dict(chunk_size=0), "chunk_size"), (dict(temperature=0.0), "temperature")])
def test_bad_keywords(backend_name, device, kw, name):
    hidden, weight, bias, ids = make((3,), 8, 11, torch.float32, device)
    with engine.backend(backend_name), pytest.raises(ValueError, match=name):
        ops.linear_token_logprobs(hidden, weight, ids, bias=bias, **kw)


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(backend_name, device, with_bias):
    if backend_name == "torch":
        pytest.skip("the torch backend is the plain reference, no custom op")
    from engine.linear_token_logprobs import linear_token_logprobs_backward_op, linear_token_logprobs_op

    hidden, weight, bias, ids = make((7,), 16, 129, torch.float32, device, bias=with_bias)
    args = (hidden.requires_grad_(), weight.requires_grad_(), ids, bias.requires_grad_() if with_bias else None)
    torch.library.opcheck(linear_token_logprobs_op, args + (0.9, True, 3, backend_name))
    _, entropy, stats = linear_token_logprobs_op(*[a.detach() if a is not None else None for a in args], 0.9, True, 3, backend_name)
    g = torch.randn(7, device=device)
    detached = tuple(a.detach() if a is not None else None for a in args)
    torch.library.opcheck(linear_token_logprobs_backward_op, detached + (stats, entropy, g, g, 0.9, 3, backend_name))


def test_torch_compile_fullgraph(backend_name, device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(hidden, weight, bias, ids):
        logp, entropy = ops.linear_token_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, chunk_size=4)
        return (logp + 0.1 * entropy).sum()

    hidden, weight, bias, ids = make((2, 5), 16, 97, torch.float32, device)
    a = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    b = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with engine.backend(backend_name):
        out = f(*a, ids)
        out.backward()
        logp, entropy = ops.linear_token_logprobs(*b[:2], ids, bias=b[2], return_entropy=True, chunk_size=4)
        ref = (logp + 0.1 * entropy).sum()
        ref.backward()
    torch.testing.assert_close(out, ref)
    for name, x, y in zip(("hidden", "weight", "bias"), a, b):
        torch.testing.assert_close(x.grad, y.grad, msg=name)


# ---- extreme values: one semantics for every backend (docs/ops.md#linear_token_logprobs) ----


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(3,), (2, 2)], ids=str)
def test_zero_hidden_size(backend_name, device, with_bias, shape):
    """H = 0: hidden @ weight.T is 0, so the logits are the bias (or 0: a uniform distribution)."""
    V = 5
    hidden, weight, bias, ids = make(shape, 0, V, torch.float32, device, bias=with_bias)
    g_logp, g_ent = torch.randn(shape, device=device), torch.randn(shape, device=device)
    logp, entropy, grads = run(backend_name, hidden, weight, bias, ids, g_logp, g_ent, chunk_size=2)
    z = (bias if with_bias else torch.zeros(V, device=device)).double().expand(*shape, V)
    logsm = torch.log_softmax(z, -1)
    torch.testing.assert_close(logp.detach().double(), logsm.gather(-1, ids[..., None]).squeeze(-1))
    torch.testing.assert_close(entropy.detach().double(), -(logsm.exp() * logsm).sum(-1))
    assert grads["hidden"].shape == hidden.shape and grads["weight"].shape == (V, 0)
    if with_bias:  # d/dbias: sum over rows of g_logp (onehot - p) + g_ent p (lse - H - z)
        zb = z.clone().requires_grad_()
        ls = torch.log_softmax(zb, -1)
        ent = -(ls.exp() * ls).sum(-1)
        ((ls.gather(-1, ids[..., None]).squeeze(-1) * g_logp.double()) + ent * g_ent.double()).sum().backward()
        torch.testing.assert_close(grads["bias"].double(), zb.grad.reshape(-1, V).sum(0), rtol=1e-5, atol=1e-6)


def test_posinf_logit_raises(backend_name, device):
    """As token_logprobs: a +inf logit (here from an inf weight) is refused, naming logits and the row."""
    hidden, weight, bias, ids = make((4,), 3, 6, torch.float32, device)
    hidden[2] = hidden[2].abs() + 0.1
    weight[1] = float("inf")
    hidden[[0, 1, 3]] = 0.0
    bias[1] = 0.0
    with engine.backend(backend_name), pytest.raises(ValueError, match=r"logits holds \+inf in row 2"):
        ops.linear_token_logprobs(hidden, weight, ids, bias=bias, chunk_size=2)


def test_temperature_that_overflows_z_raises(backend_name, device):
    hidden, weight, bias, ids = make((3,), 4, 6, torch.float32, device)
    with engine.backend(backend_name), pytest.raises(ValueError, match="temperature 1e-40 is too small"):
        ops.linear_token_logprobs(hidden, weight, ids, bias=bias, temperature=1e-40)
