"""How images are cut into Qwen2-VL / Qwen2.5-VL patches: the six settings of the image processor.

    geometry = PatchGeometry(patch_size=14, temporal_patch_size=2, merge_size=2)   # the defaults
    imgs = geometry.image_list(images, channels=3)     # checked [B_i, C, H_i, W_i] tensors
    grid_thw = geometry.grid_thw(imgs)                 # [B, 3] int64, what the processor returns

`engine.ops.patchify`, `engine.ops.patchify_embed`, `engine.reference`, `engine.image` and
`pebr.model.image_encoder` all take these settings; they build one `PatchGeometry` (which checks them once) and
pass it on, instead of repeating six keywords and their checks. The public functions that take
the six as keywords declare them once, through `@geometry_keywords`. Contracts: docs/ops.md#patchify.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import torch

from engine import _validate

# Qwen2-VL's (OpenAI CLIP's) normalization: the image processor's defaults.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_DTYPES = (torch.uint8, torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclasses.dataclass(frozen=True)
class PatchGeometry:
    """The processor's settings; a ValueError naming the field when one is unusable.

    A pixel becomes `(pixel * rescale - mean[c]) / std[c]`; an image becomes patches of
    `patch_size x patch_size` pixels, each repeated `temporal_patch_size` frames (a still image is
    a clip of identical frames), ordered in blocks of `merge_size x merge_size` patches (the
    patches one language-model token merges).
    """

    patch_size: int = 14  # P: pixels per patch side
    temporal_patch_size: int = 2  # Tp: frames per patch; an image is its one frame repeated Tp times
    merge_size: int = 2  # M: patches per merged token side; images must be multiples of P*M
    mean: tuple = OPENAI_CLIP_MEAN  # per channel, in rescaled units
    std: tuple = OPENAI_CLIP_STD  # per channel, nonzero
    rescale: float = 1 / 255  # uint8 -> [0, 1]; 1.0 for float images already in [0, 1]

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # floats, as tuples: the dataclass stays hashable and the kernels get plain numbers
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean must have one value per channel, as std ({len(std)}), got {len(mean)}")
        if any(s == 0.0 or not math.isfinite(s) for s in std) or not all(math.isfinite(m) for m in mean):
            raise ValueError(f"std must have {len(std)} nonzero finite values (and mean finite ones), got std={std}, mean={mean}")
        if not math.isfinite(float(self.rescale)):
            raise ValueError(f"rescale must be finite, got {self.rescale}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "rescale", float(self.rescale))

    @property
    def channels(self) -> int:
        """C: the number of channels mean and std describe."""
        return len(self.mean)

    @property
    def block(self) -> int:
        """P*M: image height and width must be multiples of this (one merge block)."""
        return self.patch_size * self.merge_size

    @property
    def features(self) -> int:
        """C*Tp*P*P: the width of a pixel_values row."""
        return self.channels * self.temporal_patch_size * self.patch_size * self.patch_size

    def keywords(self) -> dict:
        """The six settings as the keywords of `engine.ops.patchify` / `patchify_embed`."""
        return dataclasses.asdict(self)

    def image_list(self, images) -> list[torch.Tensor]:
        """`[B, C, H, W]` / `[C, H, W]` tensor, or a list of them -> list of `[B_i, C, H_i, W_i]` tensors.

        ValueError naming `images` (or `images[i]`) for a non-tensor, a dtype other than uint8 or
        float, a channel count other than len(mean), a size not a multiple of P*M, or mixed devices.
        """
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("images must hold at least one image")
        out = []
        for i, t in enumerate(items):
            name = f"images[{i}]" if isinstance(images, (list, tuple)) else "images"
            _validate.check_tensor(name, t, dtypes=IMAGE_DTYPES)
            if t.dim() == 3:
                t = t.unsqueeze(0)
            if t.dim() != 4:
                raise ValueError(f"{name} must be [C, H, W] or [B, C, H, W], got shape {tuple(t.shape)}")
            _, C, H, W = t.shape
            if C != self.channels:
                raise ValueError(f"{name} must have {self.channels} channels (dim -3, one per mean/std value), got {C} (shape {tuple(t.shape)})")
            if H < self.block or W < self.block:
                raise ValueError(f"{name} is {H}x{W}, smaller than one merge block ({self.block}x{self.block} = patch_size*merge_size)")
            if H % self.block or W % self.block:
                raise ValueError(
                    f"{name} is {H}x{W}: height and width must be multiples of patch_size*merge_size = {self.block} "
                    "(resize first: engine.image.smart_resize)"
                )
            self._check_float_range(name, t)
            if out and t.device != out[0].device:
                raise ValueError(f"{name} is on {t.device} but images[0] is on {out[0].device}")
            out.append(t)
        return out

    def _check_float_range(self, name: str, t: torch.Tensor) -> None:
        """Float images with the uint8 rescale (1/255) must hold [0, 255] pixels: images already in
        [0, 1] (max in (0, 1]) would be scaled by 1/255 a second time, so they are refused. An all-zero
        image is the same either way. One reduction per float image (a host sync); skipped under compile."""
        if not t.is_floating_point() or t.numel() == 0 or torch.compiler.is_compiling():
            return
        if abs(self.rescale - 1 / 255) > 1e-12:
            return
        lo, hi = (float(v) for v in torch.aminmax(t.detach()))
        if 0.0 <= lo and 0.0 < hi <= 1.0:
            raise ValueError(
                f"{name} holds float values in [0, 1] (max {hi:.3g}) but rescale is 1/255, which expects [0, 255] "
                "pixels: float images must be in [0, 255] unless rescale is given (pass rescale=1.0 for images "
                "already in [0, 1])"
            )

    def grid_thw(self, imgs: list[torch.Tensor]) -> torch.Tensor:
        """Checked images -> `[B, 3]` int64 (1, H/P, W/P) per image, on the images' device."""
        P = self.patch_size
        rows = [[1, t.shape[2] // P, t.shape[3] // P] for t in imgs for _ in range(t.shape[0])]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(imgs[0].device)

    def n_patches(self, imgs: list[torch.Tensor]) -> int:
        """N: the patch rows of checked images (sum of B_i * H_i/P * W_i/P)."""
        P = self.patch_size
        return sum(t.shape[0] * (t.shape[2] // P) * (t.shape[3] // P) for t in imgs)


_FIELDS = tuple(f.name for f in dataclasses.fields(PatchGeometry))


def geometry_keywords(fn):
    """`fn(..., *, geometry: PatchGeometry)` -> `fn(..., *, patch_size=14, temporal_patch_size=2,
    merge_size=2, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, rescale=1/255)`.

    The public ops and `engine.image` take the processor's six settings as keywords; this builds
    the one checked `PatchGeometry` from them (before `fn` runs, so a bad setting is reported
    before any work) and passes it as `geometry`. The keywords, with PatchGeometry's defaults,
    are declared by the dataclass alone; `inspect.signature` and `help` show them.
    """
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "geometry"]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in dataclasses.fields(PatchGeometry)]

    @functools.wraps(fn)
    def with_settings(*args, **kwargs):
        settings = {name: kwargs.pop(name) for name in _FIELDS if name in kwargs}
        return fn(*args, geometry=PatchGeometry(**settings), **kwargs)

    with_settings.__signature__ = sig.replace(parameters=params)
    return with_settings
