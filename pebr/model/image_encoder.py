"""Images -> the vision inputs of a Qwen2-VL / Qwen2.5-VL model.

    enc = ImageEncoder.from_folder(path)            # reads preprocessor_config.json if there
    pixel_values, grid_thw = enc([img1, img2])      # [N, C*Tp*P*P] fp32, [B, 3] int64
    enc.num_tokens(grid_thw)                        # <|image_pad|> tokens per image, [B]

The work is `engine.image.patchify_images`: Qwen's smart_resize, then `engine.ops.patchify`, equal
to `Qwen2VLImageProcessorPil`'s output. There is no fallback to that processor: an error in the
engine's path surfaces here instead of training silently on another one.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from engine.image import patchify_images
from engine.patch_geometry import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PatchGeometry


@dataclasses.dataclass(frozen=True)
class ImageEncoder:
    """The preprocessing a Qwen-VL policy expects (preprocessor_config.json's fields)."""

    patch_size: int = 14  # pixels per patch side (vision_config.patch_size)
    merge_size: int = 2  # patches merged per token side (vision_config.spatial_merge_size)
    temporal_patch_size: int = 2  # an image is repeated this many frames
    min_pixels: int = 56 * 56  # smart_resize lower bound on H*W
    max_pixels: int = 28 * 28 * 1280  # smart_resize upper bound on H*W (Qwen's default)
    image_mean: tuple = OPENAI_CLIP_MEAN  # per channel, after rescaling
    image_std: tuple = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255  # uint8 -> [0, 1]

    def __post_init__(self):
        _ = self.geometry  # checks the patch settings now (ValueError naming the field), not at the first image

    @property
    def geometry(self) -> PatchGeometry:
        """The patch settings as `engine.ops.patchify` takes them."""
        return PatchGeometry(
            patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size, merge_size=self.merge_size,
            mean=self.image_mean, std=self.image_std, rescale=self.rescale_factor,
        )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ImageEncoder":
        """Fields from `folder/preprocessor_config.json` where present, defaults otherwise."""
        path = os.path.join(folder, "preprocessor_config.json")
        if not os.path.exists(path):
            return cls()
        with open(path) as f:
            cfg = json.load(f)
        size = cfg.get("size") or {}
        kw = {}
        for name in ("patch_size", "merge_size", "temporal_patch_size"):
            if cfg.get(name) is not None:
                kw[name] = int(cfg[name])
        lo = cfg.get("min_pixels") or size.get("shortest_edge")
        hi = cfg.get("max_pixels") or size.get("longest_edge")
        if lo:
            kw["min_pixels"] = int(lo)
        if hi:
            kw["max_pixels"] = int(hi)
        if cfg.get("image_mean"):
            kw["image_mean"] = tuple(cfg["image_mean"])
        if cfg.get("image_std"):
            kw["image_std"] = tuple(cfg["image_std"])
        if cfg.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(cfg["rescale_factor"])
        return cls(**kw)

    def save(self, folder: str | os.PathLike) -> None:
        """Write preprocessor_config.json in the layout transformers' Qwen2-VL processor reads.

        `image_processor_type` names the family, not a backend: transformers 5 picks the backend
        at load time (`AutoImageProcessor.from_pretrained(folder, backend="pil")` gives
        Qwen2VLImageProcessorPil, this encoder's exact pixels, without torchvision). No config
        avoids torchvision for `AutoProcessor`: it always builds the video processor, which needs it.
        """
        cfg = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "rescale_factor": self.rescale_factor,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
        }
        with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    def __call__(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """images: list of B PIL images -> (pixel_values [N, 3*Tp*P*P] fp32, grid_thw [B, 3] int64)."""
        if len(images) == 0:
            raise ValueError("images must hold at least one image")
        return _encode(self, [im.convert("RGB") for im in images])

    def num_tokens(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """grid_thw: [B, 3] -> [B]: the <|image_pad|> tokens each image takes in the prompt."""
        return grid_thw.prod(-1) // (self.merge_size**2)


def _encode(enc: ImageEncoder, images) -> tuple[torch.Tensor, torch.Tensor]:
    # Qwen's smart_resize (PIL bicubic), then engine.ops.patchify on the uint8 pixels.
    pv, grid = patchify_images(images, min_pixels=enc.min_pixels, max_pixels=enc.max_pixels, **enc.geometry.keywords())
    return pv.float(), grid.long()
