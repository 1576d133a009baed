"""engine.ops.patch_embed and engine.ops.patchify_embed on every backend runnable here.

patch_embed is checked against the model's own module (`Qwen2_5_VisionPatchEmbed`, a Conv3d) and
fp64; patchify_embed against patch_embed(patchify(images)) in fp64 and in the same dtype
(the fused kernels fold the normalization into the weight, so they round differently: the
tolerance is the flash-attention one, no worse than 2x PyTorch's own error in that dtype).
"""
import pytest
import torch

import engine
import engine.ops as ops
from engine import reference, vision
from tests.tolerance import assert_no_worse_than_torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MEAN, STD = list(reference.OPENAI_CLIP_MEAN), list(reference.OPENAI_CLIP_STD)


def _skip_interpreter(backend, dtype=torch.float32):
    if backend == "triton" and engine._triton.interpreting() and dtype != torch.float32:
        pytest.skip("the Triton interpreter is tested in fp32 only (tl.dot on bf16 is wrong there)")


def make_weight(D, device, dtype=torch.float32, C=3, Tp=2, P=14, bias=True):
    w = (torch.randn(D, C, Tp, P, P, device=device) * 0.02).to(dtype)
    b = (torch.randn(D, device=device) * 0.1).to(dtype) if bias else None
    return w, b


def uint8_images(device, sizes=((56, 84), (28, 28)), B=1):
    return [torch.randint(0, 256, (B, 3, h, w), dtype=torch.uint8, device=device) for h, w in sizes]


# ---- patch_embed ----


def test_patch_embed_matches_qwen_conv3d(backend_name, device):
    mod = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    pe = mod.Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=48).to(device)
    x = torch.randn(37, 3 * 2 * 14 * 14, device=device)
    with torch.no_grad():
        want = pe(x)
    with engine.backend(backend_name):
        got = ops.patch_embed(x, pe.proj.weight)
    ref64 = reference.patch_embed(x.double(), pe.proj.weight.double())
    assert_no_worse_than_torch("patch_embed vs Conv3d", got, want, ref64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, D, bias", [(0, 16, True), (1, 16, False), (77, 40, True), (130, 72, False)], ids=str)
def test_patch_embed_forward_backward(backend_name, device, dtype, N, D, bias):
    _skip_interpreter(backend_name, dtype)
    w, b = make_weight(D, device, dtype, bias=bias)
    x = torch.randn(N, w[0].numel(), device=device).to(dtype)
    g = torch.randn(N, D, device=device).to(dtype)

    def run(backend, xx, ww, bb):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (xx, ww, bb)]
        if backend == "fp64":  # the truth: the reference's formula in float64
            out = reference.patch_embed(*[t.double() if t is not None else None for t in leaves])
        else:
            with engine.backend(backend):
                out = ops.patch_embed(*leaves)
        out.backward(g.to(out.dtype))
        return out, [t.grad if t is not None else None for t in leaves]

    out, grads = run(backend_name, x, w, b)
    t_out, t_grads = run("torch", x, w, b)
    r_out, r_grads = run("fp64", x, w, b)
    assert out.dtype == dtype and out.shape == (N, D)
    assert_no_worse_than_torch("out", out, t_out, r_out)
    for name, got, tg, rg in zip(("grad_pixel_values", "grad_weight", "grad_bias"), grads, t_grads, r_grads):
        if rg is None:
            assert got is None, name
            continue
        assert got.dtype == dtype and got.shape == rg.shape, name
        assert_no_worse_than_torch(name, got, tg, rg, floor=1e-5)


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
        (lambda d: (torch.randn(1176, device=d), torch.randn(8, 3, 2, 14, 14, device=d), None), "pixel_values must have 2 dims"),
    ],
)
def test_patch_embed_bad_input(backend_name, device, make, match):
    with engine.backend(backend_name), pytest.raises(ValueError, match=match):
        ops.patch_embed(*make(device))


def test_patch_embed_opcheck(backend_name, device):
    if backend_name == "torch":
        pytest.skip("the torch backend is the reference, not a custom op")
    w, b = make_weight(24, device)
    x = torch.randn(33, w[0].numel(), device=device)
    torch.library.opcheck(vision.patch_embed_op, (x, w, b, backend_name))
    torch.library.opcheck(vision.patch_embed_op, (x, w, None, backend_name))
    g = torch.randn(33, 24, device=device)
    torch.library.opcheck(vision.patch_embed_backward_op, (g, x, w, backend_name))


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


# ---- patchify_embed ----


def _fused_vs_reference(backend, images, w, b, dtype, **kw):
    """(fused out, grads) vs the same-dtype composition and fp64: forward and backward into weight and bias."""
    P = w.shape[-1]
    N = sum((t.shape[0] if t.dim() == 4 else 1) * (t.shape[-2] // P) * (t.shape[-1] // P) for t in (images if isinstance(images, list) else [images]))
    g = torch.randn(N, w.shape[0], device=w.device)

    def run(be, ww, bb):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (ww, bb)]
        if be == "fp64":  # the truth: the reference's composition in float64
            out, thw = reference.patchify_embed(images, *[t.double() if t is not None else None for t in leaves], **kw)
        else:
            with engine.backend(be):
                out, thw = ops.patchify_embed(images, leaves[0], leaves[1], **kw)
        out.backward(g.to(out.dtype))
        return out, thw, [t.grad if t is not None else None for t in leaves]

    out, thw, grads = run(backend, w, b)
    t_out, t_thw, t_grads = run("torch", w, b)
    r_out, _, r_grads = run("fp64", w, b)
    assert out.dtype == dtype and out.shape == r_out.shape
    assert thw.tolist() == t_thw.tolist()
    assert_no_worse_than_torch("embeds", out, t_out, r_out, floor=2e-6)
    for name, got, tg, rg in zip(("grad_weight", "grad_bias"), grads, t_grads, r_grads):
        if rg is None:
            assert got is None
            continue
        assert got.dtype == dtype, name
        assert_no_worse_than_torch(name, got, tg, rg, floor=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_patchify_embed_uint8_list(backend_name, device, dtype, bias):
    _skip_interpreter(backend_name, dtype)
    w, b = make_weight(40, device, dtype, bias=bias)
    _fused_vs_reference(backend_name, uint8_images(device), w, b, dtype)


def test_patchify_embed_float_batch(backend_name, device):
    w, b = make_weight(24, device)
    images = torch.rand(2, 3, 56, 28, device=device) * 255
    _fused_vs_reference(backend_name, images, w, b, torch.float32)


def test_patchify_embed_other_geometry(backend_name, device):
    # patch 7, Tp 3, merge 3, 2 channels, images in [0, 1] (rescale 1), a [C, H, W] and a [B, C, H, W]
    kw = dict(patch_size=7, temporal_patch_size=3, merge_size=3, mean=(0.5, 0.3), std=(0.25, 0.2), rescale=1.0)
    w, b = make_weight(20, device, C=2, Tp=3, P=7)
    images = [torch.rand(2, 21, 42, device=device), torch.rand(2, 2, 42, 21, device=device)]
    _fused_vs_reference(backend_name, images, w, b, torch.float32, **kw)


def test_patchify_embed_equals_patchify_then_patch_embed(backend_name, device):
    # what the docs promise, in fp32, tightly; and grid_thw is patchify's
    w, b = make_weight(32, device)
    images = uint8_images(device, sizes=((84, 56), (28, 56)), B=2)
    with engine.backend(backend_name):
        out, thw = ops.patchify_embed(images, w, b)
        pv, thw2 = ops.patchify(images)
        want = ops.patch_embed(pv, w, b)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    assert thw.tolist() == thw2.tolist() == [[1, 6, 4], [1, 6, 4], [1, 2, 4], [1, 2, 4]]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: (torch.randint(0, 255, (3, 14, 28), dtype=torch.uint8, device=d),), "images is 14x28, smaller than one merge block"),
        (lambda d: (torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8, device=d),), "images must have 3 channels"),
        (lambda d: (torch.randint(0, 255, (3, 28, 28), dtype=torch.int16, device=d),), "images must have dtype"),
        (lambda d: (torch.randint(0, 255, (3, 28, 28), dtype=torch.uint8, device=d), torch.randn(8, 3, 1, 14, 14, device=d)), "weight must be \\[D, C, temporal_patch_size=2"),
        (lambda d: (torch.randint(0, 255, (3, 28, 28), dtype=torch.uint8, device=d), torch.randn(8, 3, 2, 14, 14, device=d).long()), "weight must have dtype"),
        (lambda d: (torch.randint(0, 255, (3, 28, 28), dtype=torch.uint8, device=d), torch.randn(8, 3, 2, 14, 14, device=d), torch.randn(8, device=d).half()), "bias must have weight's dtype"),
    ],
)
def test_patchify_embed_bad_input(backend_name, device, make, match):
    args = make(device)
    images = args[0]
    w = args[1] if len(args) > 1 else torch.randn(8, 3, 2, 14, 14, device=device)
    b = args[2] if len(args) > 2 else None
    with engine.backend(backend_name), pytest.raises(ValueError, match=match):
        ops.patchify_embed(images, w, b)


def test_patchify_embed_cpp_checks_in_kernel(device):
    # the C++ op checks its own arguments too (it is callable without the Python front)
    if "cpp" not in engine.available_backends(device.type) or device.type != "cpu":
        pytest.skip("needs the cpp backend on CPU")
    w, _ = make_weight(8, device)
    with pytest.raises(ValueError, match="images\\[0\\] height and width"):
        torch.ops.engine.patchify_embed_fwd([torch.zeros(1, 3, 14, 28, dtype=torch.uint8)], w, None, 2, MEAN, STD, 1 / 255)
    with pytest.raises(ValueError, match="images\\[0\\] must have 3 channels"):
        torch.ops.engine.patchify_embed_fwd([torch.zeros(1, 2, 28, 28, dtype=torch.uint8)], w, None, 2, MEAN, STD, 1 / 255)
    with pytest.raises(ValueError, match="mean must have one value per channel"):
        torch.ops.engine.patchify_embed_fwd([torch.zeros(1, 3, 28, 28, dtype=torch.uint8)], w, None, 2, MEAN[:2], STD, 1 / 255)
    with pytest.raises(ValueError, match="grad must be"):
        torch.ops.engine.patchify_embed_bwd(torch.zeros(3, 8), [torch.zeros(1, 3, 28, 28, dtype=torch.uint8)], w, 2, MEAN, STD, 1 / 255)


def test_patchify_embed_opcheck(backend_name, device):
    if backend_name == "torch":
        pytest.skip("the torch backend is the reference, not a custom op")
    w, b = make_weight(16, device)
    w.requires_grad_()
    images = uint8_images(device, sizes=((28, 56), (56, 28)))
    args = (images, w, b, 2, MEAN, STD, 1 / 255, backend_name)
    torch.library.opcheck(vision.patchify_embed_op, args)
    g = torch.randn(16, 16, device=device)
    torch.library.opcheck(vision.patchify_embed_backward_op, (g, images, w.detach(), 2, MEAN, STD, 1 / 255, backend_name))


def test_patchify_embed_torch_compile_fullgraph(backend_name, device):
    torch._dynamo.reset()
    w, b = make_weight(16, device)
    images = uint8_images(device, sizes=((28, 56),))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(imgs, ww, bb):
        return ops.patchify_embed(imgs, ww, bb)[0].square().sum()

    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    with engine.backend(backend_name):
        loss = f(images, w1, b)
        loss.backward()
        ref = ops.patchify_embed(images, w2, b)[0].square().sum()
        ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(w1.grad, w2.grad)
