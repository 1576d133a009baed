"""engine.ops.patchify and engine.image on every backend runnable here, against transformers' image processor.

The processor (`Qwen2VLImageProcessorPil`, Pillow only: torchvision does not import beside the CPU
torch) is the ground truth for pixel_values and image_grid_thw.
"""
import numpy as np
import pytest
import torch

import engine
import engine.image as image
import engine.ops as ops
from engine import reference, vision

Qwen2VLImageProcessorPil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").Qwen2VLImageProcessorPil

# (H, W): one merge block, non-square both ways, a bigger one
SIZES = [(28, 28), (56, 84), (112, 56), (84, 140)]


def hf(images, **kw):
    """The processor on a list of [3, H, W] tensors (channels-first arrays)."""
    proc = Qwen2VLImageProcessorPil(**kw)
    out = proc(images=[im.numpy() for im in images], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def rand_uint8(H, W, device="cpu", B=None):
    shape = (3, H, W) if B is None else (B, 3, H, W)
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_patchify_uint8_matches_processor(backend_name, device, size):
    img = rand_uint8(*size, device)
    with engine.backend(backend_name):
        pv, thw = ops.patchify(img)
    ref_pv, ref_thw = hf([img.cpu()], do_resize=False)
    assert pv.dtype == torch.float32 and thw.dtype == torch.int64
    assert pv.shape == ref_pv.shape
    torch.testing.assert_close(pv.cpu(), ref_pv, atol=1e-6, rtol=0)
    assert thw.cpu().tolist() == ref_thw.tolist()


@pytest.mark.parametrize("size", [(28, 28), (56, 84)], ids=str)
def test_patchify_float_matches_processor(backend_name, device, size):
    # float pixels in [0, 255] (not integers): the processor rescales and normalizes them the same way
    img = (torch.rand(3, *size) * 255).to(device)
    with engine.backend(backend_name):
        pv, thw = ops.patchify(img)
    ref_pv, ref_thw = hf([img.cpu()], do_resize=False)
    torch.testing.assert_close(pv.cpu(), ref_pv, atol=1e-6, rtol=0)
    assert thw.cpu().tolist() == ref_thw.tolist()


def test_patchify_list_and_batch_match_processor(backend_name, device):
    imgs = [rand_uint8(56, 84, device), rand_uint8(28, 56, device), rand_uint8(84, 28, device)]
    batch = rand_uint8(56, 56, device, B=2)
    with engine.backend(backend_name):
        pv, thw = ops.patchify(imgs)
        pv_b, thw_b = ops.patchify(batch)
        pv_mix, thw_mix = ops.patchify([batch, imgs[0]])  # a [B, C, H, W] entry in a list
    ref_pv, ref_thw = hf([im.cpu() for im in imgs], do_resize=False)
    torch.testing.assert_close(pv.cpu(), ref_pv, atol=1e-6, rtol=0)
    assert thw.cpu().tolist() == ref_thw.tolist()
    ref_b, ref_thw_b = hf(list(batch.cpu()), do_resize=False)
    torch.testing.assert_close(pv_b.cpu(), ref_b, atol=1e-6, rtol=0)
    assert thw_b.cpu().tolist() == ref_thw_b.tolist() == [[1, 4, 4], [1, 4, 4]]
    torch.testing.assert_close(pv_mix.cpu(), torch.cat([ref_b, hf([imgs[0].cpu()], do_resize=False)[0]]), atol=1e-6, rtol=0)
    assert thw_mix.shape == (3, 3)


def test_patchify_custom_normalization_and_sizes(backend_name, device):
    # other keywords: patch 7, merge 3, Tp 3, per-channel mean/std, rescale 1 (float images in [0, 1])
    kw = dict(patch_size=7, temporal_patch_size=3, merge_size=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25), rescale=1.0)
    img = torch.rand(3, 42, 63, device=device)
    with engine.backend(backend_name):
        pv, thw = ops.patchify(img, **kw)
    ref_pv, ref_thw = reference.patchify(img, **kw)
    assert pv.shape == (6 * 9, 3 * 3 * 7 * 7)
    torch.testing.assert_close(pv, ref_pv, atol=1e-6, rtol=0)
    assert thw.tolist() == ref_thw.tolist() == [[1, 6, 9]]


def test_patchify_non_contiguous_image(backend_name, device):
    hwc = rand_uint8(56, 84, device).permute(1, 2, 0).contiguous()
    chw = hwc.permute(2, 0, 1)  # a view, not contiguous
    with engine.backend(backend_name):
        pv, _ = ops.patchify(chw)
    torch.testing.assert_close(pv.cpu(), hf([chw.contiguous().cpu()], do_resize=False)[0], atol=1e-6, rtol=0)


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
        (lambda d: [], "images must hold at least one image"),
        (lambda d: np.zeros((3, 28, 28), np.uint8), "images must be a torch.Tensor"),
    ],
)
def test_patchify_bad_input(backend_name, device, bad, match):
    with engine.backend(backend_name), pytest.raises(ValueError, match=match):
        ops.patchify(bad(device))


def test_patchify_bad_keywords(device):
    img = rand_uint8(28, 28, device)
    with pytest.raises(ValueError, match="mean must have one value per channel"):
        ops.patchify(img, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std must have 3 nonzero"):
        ops.patchify(img, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="images must have 2 channels"):
        ops.patchify(img, mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(ValueError, match="temporal_patch_size"):
        ops.patchify(img, temporal_patch_size=0)


def test_patchify_opcheck(backend_name, device):
    if backend_name == "torch":
        pytest.skip("the torch backend is the reference, not a custom op")
    imgs = [rand_uint8(56, 28, device, B=1), (torch.rand(1, 3, 28, 56, device=device) * 255)]
    args = (imgs, 14, 2, 2, list(reference.OPENAI_CLIP_MEAN), list(reference.OPENAI_CLIP_STD), 1 / 255, backend_name)
    torch.library.opcheck(vision.patchify_op, args)


# ---- engine.image: the front door (resize like the processor, then patchify) ----


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 4000, (500, 2), generator=gen).tolist() + [[28, 28], [1, 150], [3000, 3000], [14, 42], [42, 14]]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for kw in ({}, dict(min_pixels=128 * 28 * 28, max_pixels=512 * 28 * 28)):
            assert image.smart_resize(h, w, **kw) == hf_smart_resize(h, w, **kw), (h, w, kw)
    with pytest.raises(ValueError, match="aspect ratio"):
        image.smart_resize(10, 3000)


def test_image_front_door_matches_processor_with_resize():
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
    import io

    buf = io.BytesIO()
    pils[0].save(buf, format="PNG")
    arr = np.array(pils[0])
    for src in (arr, torch.from_numpy(arr).permute(2, 0, 1), buf.getvalue()):
        t = image.load_image(src, **kw)
        assert t.dtype == torch.uint8 and t.shape[0] == 3 and t.shape[1] % 28 == 0 and t.shape[2] % 28 == 0
        torch.testing.assert_close(t, image.load_image(pils[0], **kw), atol=0, rtol=0)


def test_image_embed_images_is_fused_patchify_embed():
    from PIL import Image

    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    pils = [Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)), Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))]
    weight, bias = torch.randn(16, 3, 2, 14, 14) * 0.02, torch.randn(16)
    emb, thw = image.embed_images(pils, weight, bias)
    pv, thw2 = image.patchify_images(pils)
    torch.testing.assert_close(emb, reference.patch_embed(pv, weight, bias), atol=2e-5, rtol=1e-5)
    assert thw.tolist() == thw2.tolist()
    with pytest.raises(ValueError, match="image must be"):
        image.load_image(3.5)
