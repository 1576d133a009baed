"""engine.ops.patchify, engine.patch_geometry and engine.image on every backend runnable here.

Two truths: transformers' image processor (`Qwen2VLImageProcessorPil`, Pillow only: torchvision does
not import beside the CPU torch), the layout the op promises to reproduce; and an fp64 truth written
in tests/patch_truth.py (each patch cut out by explicit loops, normalized in float64), which bounds
the backend AND `engine.reference.patchify`.

Bound (fp32 output; `k x eps x scale`, scale = max |truth|, at least 1): a value is
fl(fl(fl(x * rescale) - mean) / std) with mean and std rounded to fp32: five roundings of at most
eps/2 each, relative to |x * rescale| <= 1, |mean| < 1 and |out|, divided by std >= 0.2 here: at most
~6.2 eps absolute, while max |out| >= 1.8 in every test (some pixel is near 0 or 255): <= 3.4 eps x
scale, k = 4 (measured <= 1.8, kernels and reference alike). A wrong mean (0.01 off) or a missing
frame repeat is > 1e4x the bound.
"""
import dataclasses

import numpy as np
import pytest
import torch

import engine
import engine.image as image
import engine.ops as ops
from engine import patchify as patchify_module
from engine import reference
from engine.patch_geometry import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PatchGeometry
from tests.patch_truth import patches64
from tests.tolerance import assert_matches_fp64

Qwen2VLImageProcessorPil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").Qwen2VLImageProcessorPil

SIZES = [(28, 28), (56, 84), (112, 56), (84, 140)]  # one merge block, non-square both ways, a bigger one
K_PATCHIFY = 4
DEFAULT = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
# other settings everywhere at once: patch 7, Tp 3, merge 3, two channels, float images in [0, 1]
OTHER = dict(patch_size=7, temporal_patch_size=3, merge_size=3, mean=(0.5, 0.3), std=(0.25, 0.2), rescale=1.0)


def hf(images, **kw):
    """The processor on a list of [3, H, W] tensors (channels-first arrays)."""
    proc = Qwen2VLImageProcessorPil(**kw)
    out = proc(images=[im.numpy() for im in images], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def rand_uint8(H, W, device="cpu", B=None):
    shape = (3, H, W) if B is None else (B, 3, H, W)
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)


def check_fp64(backend, images, **kw):
    """patchify on `backend` and engine.reference, both within the bound of the fp64 truth."""
    with engine.backend(backend):
        pv, thw = ops.patchify(images, **kw)
    ref, ref_thw = reference.patchify(images, geometry=PatchGeometry(**kw))
    truth = patches64(images, **{**DEFAULT, **kw})
    assert pv.dtype == torch.float32 and thw.dtype == torch.int64
    assert_matches_fp64("pixel_values", pv, truth, dtype=torch.float32, k=K_PATCHIFY, torch_out=ref)
    assert thw.tolist() == ref_thw.tolist()
    return pv, thw


# ---- against the fp64 truth ----


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_patchify_matches_fp64_default_settings(backend_name, device, kind):
    # a batch, a single [C, H, W] and an odd size in one list: merge-block order across images
    images = [rand_uint8(56, 84, device, B=2), rand_uint8(28, 28, device), rand_uint8(84, 28, device)]
    if kind == "float":
        images = [im.float() + torch.rand(im.shape, device=device) * 0.99 for im in images]  # in [0, 256), not integers
    _, thw = check_fp64(backend_name, images)
    assert thw.tolist() == [[1, 4, 6], [1, 4, 6], [1, 2, 2], [1, 6, 2]]


def test_patchify_matches_fp64_other_settings(backend_name, device):
    # every setting off its default at once: a kernel that hard-codes one of them fails here
    images = [torch.rand(2, 21, 42, device=device), torch.rand(2, 2, 42, 21, device=device)]
    pv, thw = check_fp64(backend_name, images, **OTHER)
    assert pv.shape == (18 + 2 * 18, 2 * 3 * 7 * 7)  # a [C, 21, 42] image (3 x 6 patches) and a batch of two 42 x 21
    assert thw.tolist() == [[1, 3, 6], [1, 6, 3], [1, 6, 3]]


def test_patchify_one_patch(backend_name, device):
    # merge_size 1 and a 14x14 image: exactly one patch
    pv, thw = check_fp64(backend_name, rand_uint8(14, 14, device), merge_size=1)
    assert pv.shape == (1, 3 * 2 * 14 * 14) and thw.tolist() == [[1, 1, 1]]


def test_patchify_empty_batch(backend_name, device):
    pv, thw = check_fp64(backend_name, rand_uint8(28, 56, device, B=0))
    assert pv.shape == (0, 3 * 2 * 14 * 14) and thw.shape == (0, 3)


def test_patchify_catches_wrong_mean_and_missing_frame_repeat(backend_name, device):
    """What this file's fp64 truth guards against, each channel with its own mean and std: a reference
    (or kernel) that swaps or drops a channel's mean, or writes one frame instead of Tp, fails the bound.
    Kept as its own test so that a mutation of engine.reference.patchify is caught by name."""
    kw = dict(mean=(0.1, 0.5, 0.9), std=(0.3, 0.2, 0.25), temporal_patch_size=2)
    pv, _ = check_fp64(backend_name, rand_uint8(28, 56, device), **kw)
    frames = pv.view(-1, 3, 2, 14 * 14)
    assert torch.equal(frames[:, :, 0], frames[:, :, 1]), "the Tp frames of a still image are one frame repeated"


def test_patchify_non_contiguous_image(backend_name, device):
    hwc = rand_uint8(56, 84, device).permute(1, 2, 0).contiguous()
    chw = hwc.permute(2, 0, 1)  # a view, not contiguous
    check_fp64(backend_name, chw)


# ---- against the image processor (the layout promised) ----


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_patchify_uint8_matches_processor(backend_name, device, size):
    img = rand_uint8(*size, device)
    with engine.backend(backend_name):
        pv, thw = ops.patchify(img)
    ref_pv, ref_thw = hf([img.cpu()], do_resize=False)
    # the processor computes in the same fp32 steps: equal up to the last bit or two
    torch.testing.assert_close(pv.cpu(), ref_pv, atol=1e-6, rtol=0)
    assert thw.cpu().tolist() == ref_thw.tolist()


def test_patchify_uint8_equals_the_reference_bitwise(backend_name, device):
    # the same roundings in the same order (x * rescale in fp64, rounded once to fp32; (v - mean) / std
    # in fp32, the division rounded to nearest): every backend equals the reference to the bit. A
    # rescale factor passed as fp32 (126 of the 256 values of x * (1/255) round differently) or an
    # approximate division (CUDA --use_fast_math `/`, Triton's fp32 `/`) does not. Triton's interpreter
    # keeps a Python float argument in float64 and divides in IEEE: there this only runs the kernel;
    # compiled on a GPU it catches both.
    every_value = (torch.arange(3 * 28 * 28) % 256).to(torch.uint8).reshape(3, 28, 28)  # 0..255, each channel
    img = torch.cat([every_value, rand_uint8(28, 28)], dim=1).to(device)
    with engine.backend("torch"):
        want, _ = ops.patchify(img)
    with engine.backend(backend_name):
        got, _ = ops.patchify(img)
    assert torch.equal(got.cpu(), want.cpu()), f"{(got.cpu() - want.cpu()).abs().max().item():.3g} off the reference"


def test_patchify_float_and_lists_match_processor(backend_name, device):
    imgs = [(torch.rand(3, 56, 84) * 255).to(device), rand_uint8(28, 56, device)]
    batch = rand_uint8(56, 56, device, B=2)
    with engine.backend(backend_name):
        pv, thw = ops.patchify([batch, *imgs])  # a [B, C, H, W] entry in a list, then [C, H, W] ones
    ref_pv, ref_thw = hf([*batch.cpu(), *(im.cpu() for im in imgs)], do_resize=False)
    torch.testing.assert_close(pv.cpu(), ref_pv, atol=1e-6, rtol=0)
    assert thw.cpu().tolist() == ref_thw.tolist() == [[1, 4, 4], [1, 4, 4], [1, 4, 6], [1, 2, 4]]


# ---- bad input ----


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda d: rand_uint8(14, 28, d), "images.*smaller than one merge block"),
        (lambda d: rand_uint8(28, 14, d), "images.*smaller than one merge block"),
        (lambda d: rand_uint8(30, 28, d), "images.*multiples of patch_size\\*merge_size"),
        (lambda d: torch.randint(0, 255, (4, 28, 28), dtype=torch.uint8, device=d), "images must have 3 channels"),
        (lambda d: torch.randint(0, 255, (3, 28, 28), dtype=torch.int32, device=d), "images must have dtype"),
        (lambda d: torch.zeros(28, 28, dtype=torch.uint8, device=d), "images must be \\[C, H, W\\]"),
        (lambda d: [rand_uint8(28, 28, d), rand_uint8(28, 14, d)], "images\\[1\\].*smaller"),
        (lambda d: [rand_uint8(28, 28, d), rand_uint8(28, 28, "meta")], "images\\[1\\] is on meta"),
        (lambda d: [], "images must hold at least one image"),
        (lambda d: np.zeros((3, 28, 28), np.uint8), "images must be a torch.Tensor"),
    ],
)
def test_patchify_bad_input(backend_name, device, bad, match):
    with engine.backend(backend_name), pytest.raises(ValueError, match=match):
        ops.patchify(bad(device))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mean=(0.5, 0.5)), "mean must have one value per channel"),
        (dict(std=(0.2, 0.0, 0.2)), "std must have 3 nonzero"),
        (dict(std=(0.2, float("nan"), 0.2)), "std must have 3 nonzero"),
        (dict(mean=(0.5, 0.5), std=(0.2, 0.2)), "images must have 2 channels"),
        (dict(temporal_patch_size=0), "temporal_patch_size must be a positive int"),
        (dict(patch_size=0), "patch_size must be a positive int"),
        (dict(merge_size=2.0), "merge_size must be a positive int"),
        (dict(rescale=float("inf")), "rescale must be finite"),
    ],
)
def test_patchify_bad_settings(device, kw, match):
    with pytest.raises(ValueError, match=match):
        ops.patchify(rand_uint8(28, 28, device), **kw)


def test_patch_geometry_is_one_frozen_value():
    g = PatchGeometry(mean=[0.5, 0.5, 0.5], std=np.array([0.5, 0.5, 0.5]))
    assert g.mean == (0.5, 0.5, 0.5) and isinstance(g.std, tuple) and hash(g) == hash(PatchGeometry(mean=(0.5,) * 3, std=(0.5,) * 3))
    assert (g.channels, g.block, g.features) == (3, 28, 3 * 2 * 14 * 14)
    assert set(g.keywords()) == {"patch_size", "temporal_patch_size", "merge_size", "mean", "std", "rescale"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.patch_size = 16


def test_patchify_kernel_checks_its_arguments(device):
    # the C++ kernel is callable without the Python front: it checks its own arguments
    if "cpp" not in engine.available_backends(device.type) or device.type != "cpu":
        pytest.skip("needs the cpp backend on CPU")
    mean, std = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    img = torch.zeros(1, 3, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="temporal_patch_size must be positive"):
        torch.ops.engine.patchify_fwd([img], 14, 0, 2, mean, std, 1 / 255)
    with pytest.raises(ValueError, match="images\\[0\\] height and width"):
        torch.ops.engine.patchify_fwd([img[..., :14]], 14, 2, 2, mean, std, 1 / 255)
    with pytest.raises(ValueError, match="std must be finite and nonzero"):
        torch.ops.engine.patchify_fwd([img], 14, 2, 2, mean, [0.2, 0.0, 0.2], 1 / 255)


def test_patchify_opcheck(backend_name, device):
    if backend_name == "torch":
        pytest.skip("the torch backend is the reference, not a custom op")
    imgs = [rand_uint8(56, 28, device, B=1), (torch.rand(1, 3, 28, 56, device=device) * 255)]
    args = (imgs, 14, 2, 2, list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD), 1 / 255, backend_name)
    torch.library.opcheck(patchify_module.patchify_op, args)


# ---- engine.image: the front door (resize like the processor, then patchify) ----


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    sizes = torch.randint(1, 4000, (500, 2)).tolist() + [[28, 28], [1, 150], [3000, 3000], [14, 42], [42, 14]]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for kw in ({}, dict(min_pixels=128 * 28 * 28, max_pixels=512 * 28 * 28)):
            assert image.smart_resize(h, w, **kw) == hf_smart_resize(h, w, **kw), (h, w, kw)
    with pytest.raises(ValueError, match="aspect ratio"):
        image.smart_resize(10, 3000)


def test_image_front_door_matches_processor_with_resize():
    import io

    from PIL import Image

    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    pils = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(100, 150), (37, 300), (61, 20)]]
    kw = dict(min_pixels=56 * 56, max_pixels=64 * 28 * 28)
    out = Qwen2VLImageProcessorPil(**kw)(images=pils, return_tensors="pt")
    pv, thw = image.patchify_images(pils, **kw)
    torch.testing.assert_close(pv, out["pixel_values"], atol=1e-6, rtol=0)
    assert thw.tolist() == out["image_grid_thw"].tolist()
    assert image.num_image_tokens(thw) == [int(t * h * w) // 4 for t, h, w in thw.tolist()]
    # the same through an array, a CHW tensor and encoded bytes
    buf = io.BytesIO()
    pils[0].save(buf, format="PNG")
    arr = np.array(pils[0])
    for src in (arr, torch.from_numpy(arr).permute(2, 0, 1), buf.getvalue()):
        t = image.load_image(src, **kw)
        assert t.dtype == torch.uint8 and t.shape[0] == 3 and t.shape[1] % 28 == 0 and t.shape[2] % 28 == 0
        torch.testing.assert_close(t, image.load_image(pils[0], **kw), atol=0, rtol=0)


def test_image_front_door_checks_settings_first():
    # a bad setting is reported before any image is decoded or resized
    with pytest.raises(ValueError, match="std must have 3 nonzero"):
        image.patchify_images([b"not an image"], std=(0.0, 1.0, 1.0))


# ---- extreme values: one semantics for every backend (docs/ops.md#patchify) ----


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16], ids=str)
def test_empty_batch_every_backend(backend_name, device, dtype):
    """B = 0 images: pixel_values [0, C*Tp*P*P] fp32 and grid_thw [0, 3] on every backend."""
    empty = torch.zeros(0, 3, 28, 56, device=device, dtype=dtype)
    for images in (empty, [empty], [empty, empty[:, :, :, :28]]):
        with engine.backend(backend_name):
            pv, thw = ops.patchify(images)
        assert pv.shape == (0, 3 * 2 * 14 * 14) and pv.dtype == torch.float32
        assert thw.shape == (0, 3) and thw.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_float_images_in_unit_range_are_refused(backend_name, device, dtype):
    """Float images already in [0, 1] with rescale 1/255 would be scaled twice: ValueError naming images."""
    unit = torch.rand(3, 28, 28, device=device).to(dtype)
    with engine.backend(backend_name), pytest.raises(ValueError, match=r"images holds float values in \[0, 1\]"):
        ops.patchify(unit)
    with engine.backend(backend_name), pytest.raises(ValueError, match=r"images\[1\] holds float values in \[0, 1\]"):
        ops.patchify([unit * 255, unit])
    with engine.backend(backend_name):
        assert ops.patchify(unit, rescale=1.0)[0].shape == (4, 1176)
        assert ops.patchify(unit * 255)[0].shape == (4, 1176)
