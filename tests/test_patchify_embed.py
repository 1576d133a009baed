"""engine.ops.patchify_embed (and engine.image.embed_images) on every backend runnable here: the
backend AND `engine.reference.patchify_embed` against an fp64 truth written in tests/patch_truth.py
(patches cut out by explicit loops and normalized in float64, then the float64 Conv3d).

Bounds (`k x eps(dtype) x scale`, tests/tolerance.py). The fused kernels fold the normalization and
the Tp repeat into the weight, the reference casts normalized patches to the weight's dtype: they
round different things, so both are held to the truth, not to each other.
- fp32: as for patch_embed (tests/test_patch_embed.py): scale = dot_scale, the size of the GEMM's
  terms; the fold adds about two roundings per term (the Tp sum, the 1/std factor): k = 8
  (measured <= 2.3, grad_weight).
- bf16 / fp16: each term carries one input rounding of eps/2 (the reference's cast of the
  normalized pixel, the kernels' cast of the folded weight); these add like a random walk, to about
  eps/2 x the root of the sum of squared terms, which for these random weights is the size of the
  result; then the result is rounded once (eps/2 |out|): scale max |truth|, k = 4 (measured <= 0.53).
"""
import pytest
import torch

import engine
import engine.image as image
import engine.ops as ops
from engine import patchify_embed as patchify_embed_module
from engine import reference
from engine.patch_geometry import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PatchGeometry
from tests.patch_truth import conv3d64, dot_scale, make_weight, patches64, skip_interpreter
from tests.tolerance import assert_matches_fp64

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
K = {torch.float32: 8, torch.bfloat16: 4, torch.float16: 4}
MEAN, STD = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)


def uint8_images(device, sizes=((56, 84), (28, 28)), B=1):
    return [torch.randint(0, 256, (B, 3, h, w), dtype=torch.uint8, device=device) for h, w in sizes]


def run(backend, images, w, b, g, kw):
    """(embeds, grid_thw, {name: grad}) on `backend` (or `engine.reference` for "reference")."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in (("weight", w), ("bias", b)) if t is not None}
    if backend == "reference":
        out, thw = reference.patchify_embed(images, leaves["weight"], leaves.get("bias"), geometry=PatchGeometry(**kw))
    else:
        with engine.backend(backend):
            out, thw = ops.patchify_embed(images, leaves["weight"], leaves.get("bias"), **kw)
    if out.requires_grad:
        out.backward(g)
    return out, thw, {n: t.grad for n, t in leaves.items()}


def check_fp64(backend, images, w, b, dtype, **kw):
    """Forward and backward (into weight and bias) of `backend` and the reference against the fp64 truth."""
    pv64 = patches64(images, **{"mean": MEAN, "std": STD, **kw})
    N, D = pv64.shape[0], w.shape[0]
    g = torch.randn(N, D, device=w.device).to(dtype)
    out, thw, grads = run(backend, images, w, b, g, kw)
    ref, ref_thw, ref_grads = run("reference", images, w, b, g, kw)
    leaves = {n: t.detach().cpu().double().requires_grad_() for n, t in (("weight", w), ("bias", b)) if t is not None}
    truth = conv3d64(pv64, leaves["weight"], leaves.get("bias"))
    if N:
        truth.backward(g.cpu().double())
    g64, w64 = g.cpu().double(), w.cpu().double().reshape(D, -1)
    fp32 = dtype == torch.float32
    scales = {  # fp32 only (see the top): the GEMM behind each result
        "embeds": dot_scale(pv64, w64.t()) + (0.0 if b is None else float(b.abs().max())),
        "weight": dot_scale(g64.t(), pv64),
        "bias": dot_scale(g64.t(), torch.ones(N, 1, dtype=torch.float64)),
    }
    assert out.dtype == dtype and thw.tolist() == ref_thw.tolist()
    assert_matches_fp64("embeds", out, truth.detach(), dtype=dtype, k=K[dtype], scale=scales["embeds"] if fp32 else None, torch_out=ref)
    for name, leaf in leaves.items():
        want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)  # an empty batch: no gradient
        assert grads[name].dtype == dtype, name
        assert_matches_fp64(
            f"grad_{name}", grads[name], want, dtype=dtype, k=K[dtype], scale=scales[name] if fp32 else None, torch_out=ref_grads[name]
        )
    return out, thw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_patchify_embed_uint8_list(backend_name, device, dtype, bias):
    skip_interpreter(backend_name, dtype)
    w, b = make_weight(40, device, dtype, bias=bias)  # D = 40: not a multiple of any block size
    _, thw = check_fp64(backend_name, uint8_images(device, B=2), w, b, dtype)
    assert thw.tolist() == [[1, 4, 6], [1, 4, 6], [1, 2, 2], [1, 2, 2]]


def test_patchify_embed_float_batch(backend_name, device):
    w, b = make_weight(24, device)
    check_fp64(backend_name, torch.rand(2, 3, 56, 28, device=device) * 255, w, b, torch.float32)


def test_patchify_embed_other_geometry(backend_name, device):
    # patch 7, Tp 3, merge 3, 2 channels, images in [0, 1] (rescale 1), a [C, H, W] and a [B, C, H, W]
    kw = dict(patch_size=7, temporal_patch_size=3, merge_size=3, mean=(0.5, 0.3), std=(0.25, 0.2), rescale=1.0)
    w, b = make_weight(20, device, C=2, Tp=3, P=7)
    images = [torch.rand(2, 21, 42, device=device), torch.rand(2, 2, 42, 21, device=device)]
    check_fp64(backend_name, images, w, b, torch.float32, **kw)


def test_patchify_embed_one_patch_and_empty_batch(backend_name, device):
    w, b = make_weight(16, device)
    out, thw = check_fp64(backend_name, uint8_images(device, sizes=((14, 14),)), w, b, torch.float32, merge_size=1)
    assert out.shape == (1, 16) and thw.tolist() == [[1, 1, 1]]
    out, thw = check_fp64(backend_name, uint8_images(device, sizes=((28, 56),), B=0), w, b, torch.float32)
    assert out.shape == (0, 16) and thw.shape == (0, 3)


def test_patchify_embed_equals_patchify_then_patch_embed(backend_name, device):
    # what the docs promise, in fp32; grid_thw is patchify's. Both sides round differently (the fold),
    # so they agree to the fp32 bound of the GEMM (k = 8 x 2: each side within k of the truth).
    w, b = make_weight(32, device)
    images = uint8_images(device, sizes=((84, 56), (28, 56)), B=2)
    with engine.backend(backend_name):
        out, thw = ops.patchify_embed(images, w, b)
        pv, thw2 = ops.patchify(images)
        want = ops.patch_embed(pv, w, b)
    scale = dot_scale(pv, w.reshape(32, -1).t()) + float(b.abs().max())
    assert_matches_fp64("fused vs composed", out, want.double(), dtype=torch.float32, k=2 * K[torch.float32], scale=scale)
    assert thw.tolist() == thw2.tolist() == [[1, 6, 4], [1, 6, 4], [1, 2, 4], [1, 2, 4]]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: (torch.randint(0, 255, (3, 14, 28), dtype=torch.uint8, device=d),), "images is 14x28, smaller than one merge block"),
        (lambda d: (torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8, device=d),), "images must have 3 channels"),
        (lambda d: (torch.randint(0, 255, (3, 28, 28), dtype=torch.int16, device=d),), "images must have dtype"),
        (lambda d: (torch.randint(0, 255, (3, 28, 28), dtype=torch.uint8, device="meta"),), "images is on meta"),
        (lambda d: (torch.randint(0, 255, (3, 28, 28), dtype=torch.uint8, device=d), torch.randn(8, 3, 1, 14, 14, device=d)), "weight must be \\[D, C, temporal_patch_size=2"),
        (lambda d: (torch.randint(0, 255, (3, 28, 28), dtype=torch.uint8, device=d), torch.randn(8, 3, 2, 14, 14, device=d).long()), "weight must have dtype"),
        (lambda d: (torch.randint(0, 255, (3, 28, 28), dtype=torch.uint8, device=d), torch.randn(8, 3, 2, 14, 14, device=d), torch.randn(8, device=d).half()), "bias must have weight's dtype"),
        (lambda d: (torch.randint(0, 255, (2, 28, 28), dtype=torch.uint8, device=d), torch.randn(8, 2, 2, 14, 14, device=d)), "mean must have one value per channel of weight \\(2\\)"),
    ],
)
def test_patchify_embed_bad_input(backend_name, device, make, match):
    args = make(device)
    images = args[0]
    w = args[1] if len(args) > 1 else torch.randn(8, 3, 2, 14, 14, device=device)
    b = args[2] if len(args) > 2 else None
    with engine.backend(backend_name), pytest.raises(ValueError, match=match):
        ops.patchify_embed(images, w, b)


def test_patchify_embed_kernel_checks_its_arguments(device):
    # the C++ kernel is callable without the Python front: it checks its own arguments
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
    torch.library.opcheck(patchify_embed_module.patchify_embed_op, args)
    g = torch.randn(16, 16, device=device)
    torch.library.opcheck(patchify_embed_module.patchify_embed_backward_op, (g, images, w.detach(), 2, MEAN, STD, 1 / 255, backend_name))


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


def test_image_embed_images_is_fused_patchify_embed():
    # engine.image's front door: resize like the processor, then the fused op; same as patchify_images + Conv3d
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    pils = [Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)), Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))]
    weight, bias = torch.randn(16, 3, 2, 14, 14) * 0.02, torch.randn(16)
    emb, thw = image.embed_images(pils, weight, bias)
    pv, thw2 = image.patchify_images(pils)
    scale = dot_scale(pv, weight.reshape(16, -1).t()) + float(bias.abs().max())
    assert_matches_fp64("embed_images", emb, conv3d64(pv, weight, bias).detach(), dtype=torch.float32, k=K[torch.float32], scale=scale)
    assert thw.tolist() == thw2.tolist()
    with pytest.raises(ValueError, match="image must be"):
        image.load_image(3.5)


# ---- extreme values: one semantics for every backend (docs/ops.md#patchify_embed) ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["uint8", "float", "list", "no-bias"])
def test_empty_batch_every_backend(backend_name, device, dtype, kind):
    """B = 0 images: embeds [0, D] in weight's dtype, grid_thw [0, 3], zero weight/bias gradients."""
    w, b = make_weight(16, device, dtype)
    if kind == "no-bias":
        b = None
    empty = torch.zeros(0, 3, 28, 56, device=device, dtype=torch.float32 if kind == "float" else torch.uint8)
    images = [empty, empty[:, :, :, :28]] if kind == "list" else empty
    out, thw, grads = run(backend_name, images, w, b, torch.zeros(0, 16, device=device, dtype=dtype), {})
    assert out.shape == (0, 16) and out.dtype == dtype and thw.shape == (0, 3) and thw.dtype == torch.int64
    ref, ref_thw, _ = run("reference", images if isinstance(images, list) else [images], w, b,
                          torch.zeros(0, 16, device=device, dtype=dtype), {})
    assert ref.shape == (0, 16) and ref.dtype == dtype
    for name, g in grads.items():
        if g is not None:
            assert g.shape == (w if name == "weight" else b).shape and not g.any()


@pytest.mark.parametrize("images_in", ["tensor", "list"])
def test_float_images_in_unit_range_are_refused(backend_name, device, images_in):
    """Float images already in [0, 1] with the uint8 rescale (1/255) would be scaled twice: ValueError
    naming images; rescale=1.0 takes them, and [0, 255] floats are taken as they are."""
    w, b = make_weight(16, device)
    unit = torch.rand(1, 3, 28, 28, device=device)
    images = [unit] if images_in == "list" else unit
    name = "images\\[0\\]" if images_in == "list" else "images"
    with engine.backend(backend_name), pytest.raises(ValueError, match=f"{name} holds float values in \\[0, 1\\].*rescale"):
        ops.patchify_embed(images, w, b)
    with engine.backend(backend_name):
        out, _ = ops.patchify_embed(images, w, b, rescale=1.0)
        assert out.shape == (4, 16) and torch.isfinite(out).all()
        ops.patchify_embed(unit * 255, w, b)  # [0, 255] floats
        ops.patchify_embed(torch.zeros(1, 3, 28, 28, device=device), w, b)  # all black: the same either way
