"""engine.ops.patch_embed on every backend runnable here: the backend AND `engine.reference` against
an fp64 truth written in tests/patch_truth.py (a float64 Conv3d, the model's own layer).

Bounds (`k x eps(dtype) x scale`, tests/tolerance.py), the same for the output and every gradient:
- fp32: the result is a GEMM accumulated in fp32 over K terms (K = 1176 for the output, N or D for
  the gradients). Its rounding is relative to the size of those terms, so scale = dot_scale =
  max sum_k |a_ik| |b_kj| (tests/patch_truth.py). Each of the K additions rounds by eps/2 of a
  partial sum ~ sqrt(K) rms|term|; unbiased, they add up like a random walk to ~ eps/2 K rms|term|,
  i.e. about eps x sum |terms| / 2. We measure at most 2.2 (grad_weight, N = 130, any backend and
  the reference alike): k = 8; one wrong term (a pixel x a weight, ~1e-2) is still > 1000x the bound.
- bf16 / fp16: the truth reads the same rounded inputs, so only the result's rounding counts: one
  rounding to the dtype after fp32 accumulation, eps/2 x |result|: scale max |truth| (the
  default), k = 2 (measured <= 0.44).
"""
import pytest
import torch

import engine
import engine.ops as ops
from engine import patch_embed as patch_embed_module
from tests.patch_truth import conv3d64, dot_scale, make_weight, skip_interpreter
from tests.tolerance import assert_matches_fp64

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
K_OUT = {torch.float32: 8, torch.bfloat16: 2, torch.float16: 2}


def run(backend, x, w, b, g):
    """(out, {name: grad}) of patch_embed on `backend` (or `engine.reference` for "reference")."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in (("pixel_values", x), ("weight", w), ("bias", b)) if t is not None}
    args = (leaves["pixel_values"], leaves["weight"], leaves.get("bias"))
    if backend == "reference":
        out = engine.reference.patch_embed(*args)
    else:
        with engine.backend(backend):
            out = ops.patch_embed(*args)
    out.backward(g)
    return out, {n: t.grad for n, t in leaves.items()}


def truth64(x, w, b, g):
    """fp64 (out, {name: grad}, {name: scale}) by autograd through the float64 Conv3d."""
    leaves = {n: t.detach().cpu().double().requires_grad_() for n, t in (("pixel_values", x), ("weight", w), ("bias", b)) if t is not None}
    out = conv3d64(leaves["pixel_values"], leaves["weight"], leaves.get("bias"))
    if out.requires_grad:
        out.backward(g.cpu().double())
    else:  # an empty batch: conv3d builds no graph; every gradient is a sum of nothing
        for t in leaves.values():
            t.grad = torch.zeros_like(t)
    D = w.shape[0]
    x64, w64, g64 = x.cpu().double(), w.cpu().double().reshape(D, -1), g.cpu().double()
    scales = {  # the GEMM behind each result: out = x W^T (+ b), gx = g W, gW = g^T x, gb = sum_n g
        "out": dot_scale(x64, w64.t()) + (0.0 if b is None else float(b.abs().max())),
        "pixel_values": dot_scale(g64, w64),
        "weight": dot_scale(g64.t(), x64),
        "bias": dot_scale(g64.t(), torch.ones(g64.shape[0], 1, dtype=torch.float64)),
    }
    return out.detach(), {n: t.grad for n, t in leaves.items()}, scales


def test_patch_embed_matches_qwen_conv3d(backend_name, device):
    # the model's own module, in fp32, against the same fp64 truth
    mod = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    pe = mod.Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=48).to(device)
    x = torch.randn(37, 3 * 2 * 14 * 14, device=device)
    with torch.no_grad():
        hf = pe(x)
    with engine.backend(backend_name):
        got = ops.patch_embed(x, pe.proj.weight)
    truth = conv3d64(x, pe.proj.weight).detach()
    scale = dot_scale(x, pe.proj.weight.reshape(48, -1).t())
    assert_matches_fp64("patch_embed vs Conv3d", got, truth, dtype=torch.float32, k=K_OUT[torch.float32], scale=scale, torch_out=hf)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "N, D, bias",
    [(0, 16, True), (1, 16, False), (77, 40, True), (130, 72, False)],  # empty batch, one patch, sizes off the block sizes
    ids=str,
)
def test_patch_embed_forward_backward(backend_name, device, dtype, N, D, bias):
    skip_interpreter(backend_name, dtype)
    w, b = make_weight(D, device, dtype, bias=bias)
    x = torch.randn(N, w[0].numel(), device=device).to(dtype)
    g = torch.randn(N, D, device=device).to(dtype)
    out, grads = run(backend_name, x, w, b, g)
    ref_out, ref_grads = run("reference", x, w, b, g)
    t_out, t_grads, scales = truth64(x, w, b, g)
    assert out.dtype == dtype and out.shape == (N, D)
    fp32 = dtype == torch.float32
    assert_matches_fp64("out", out, t_out, dtype=dtype, k=K_OUT[dtype], scale=scales["out"] if fp32 else None, torch_out=ref_out)
    assert set(grads) == set(t_grads), "every input gets a gradient, and only those"
    for name, truth in t_grads.items():
        # gradients are returned in the input dtype and rounded once to it: the same bound as out
        assert grads[name].dtype == dtype, name
        assert_matches_fp64(
            f"grad_{name}", grads[name], truth, dtype=dtype, k=K_OUT[dtype], scale=scales[name] if fp32 else None, torch_out=ref_grads[name]
        )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: (torch.randn(4, 1176, device=d), torch.randn(8, 3, 2, 14, device=d), None), "weight must have 5 dims"),
        (lambda d: (torch.randn(4, 1176, device=d), torch.randn(8, 3, 2, 14, 13, device=d), None), "weight must be .*square"),
        (lambda d: (torch.randn(4, 1175, device=d), torch.randn(8, 3, 2, 14, 14, device=d), None), "pixel_values must be \\[N, C\\*Tp\\*P\\*P\\]"),
        (lambda d: (torch.randn(4, 1176, device=d).half(), torch.randn(8, 3, 2, 14, 14, device=d), None), "pixel_values must have weight's dtype"),
        (lambda d: (torch.ones(4, 1176, dtype=torch.int64, device=d), torch.randn(8, 3, 2, 14, 14, device=d), None), "pixel_values must have dtype"),
        (lambda d: (torch.randn(4, 1176, device=d), torch.ones(8, 3, 2, 14, 14, dtype=torch.int32, device=d), None), "weight must have dtype"),
        (lambda d: (torch.randn(4, 1176, device=d), torch.randn(8, 3, 2, 14, 14, device=d), torch.randn(7, device=d)), "bias must have shape"),
        (lambda d: (torch.randn(4, 1176, device=d), torch.randn(8, 3, 2, 14, 14, device=d), torch.randn(8, device=d).half()), "bias must have weight's dtype"),
        (lambda d: (torch.randn(1176, device=d), torch.randn(8, 3, 2, 14, 14, device=d), None), "pixel_values must have 2 dims"),
        (lambda d: (torch.randn(4, 1176, device="meta"), torch.randn(8, 3, 2, 14, 14, device=d), None), "pixel_values is on meta"),
    ],
)
def test_patch_embed_bad_input(backend_name, device, make, match):
    with engine.backend(backend_name), pytest.raises(ValueError, match=match):
        ops.patch_embed(*make(device))


def test_patch_embed_kernel_checks_its_arguments(device):
    # the C++ kernel is callable without the Python front: it checks shapes and dtypes itself
    if "cpp" not in engine.available_backends(device.type) or device.type != "cpu":
        pytest.skip("needs the cpp backend on CPU")
    w = torch.randn(8, 3, 2, 14, 14)
    with pytest.raises(ValueError, match="pixel_values must be \\[N, C\\*Tp\\*P\\*P\\]"):
        torch.ops.engine.patch_embed_fwd(torch.randn(4, 1175), w, None)
    with pytest.raises(ValueError, match="pixel_values must have weight's dtype"):
        torch.ops.engine.patch_embed_fwd(torch.randn(4, 1176).double(), w, None)
    with pytest.raises(ValueError, match="grad must be \\[N, D\\]"):
        torch.ops.engine.patch_embed_bwd(torch.randn(4, 7), torch.randn(4, 1176), w)


def test_patch_embed_opcheck(backend_name, device):
    if backend_name == "torch":
        pytest.skip("the torch backend is the reference, not a custom op")
    w, b = make_weight(24, device)
    x = torch.randn(33, w[0].numel(), device=device)
    torch.library.opcheck(patch_embed_module.patch_embed_op, (x, w, b, backend_name))
    torch.library.opcheck(patch_embed_module.patch_embed_op, (x, w, None, backend_name))
    g = torch.randn(33, 24, device=device)
    torch.library.opcheck(patch_embed_module.patch_embed_backward_op, (g, x, w, backend_name))


def test_patch_embed_torch_compile_fullgraph(backend_name, device):
    torch._dynamo.reset()
    w, b = make_weight(24, device)
    x = torch.randn(20, w[0].numel(), device=device)

    @torch.compile(fullgraph=True, backend="inductor" if backend_name == "cpp" else "aot_eager")
    def f(xx, ww, bb):
        return torch.nn.functional.gelu(ops.patch_embed(xx, ww, bb)).sum()

    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    with engine.backend(backend_name):
        loss = f(x, w1, b)
        loss.backward()
        ref = torch.nn.functional.gelu(ops.patch_embed(x, w2, b)).sum()
        ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(w1.grad, w2.grad)
