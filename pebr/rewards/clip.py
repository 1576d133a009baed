"""The clip term of the stage-1 reward: `min(1, cos/0.4)` of the image description against the
image (an item with several images: the mean cosine over them) under a CLIP-family model from a
local folder."""
from __future__ import annotations

import json
import math
import os
from typing import Any

from pebr.rewards.sections import (
    RewardFailures,
    as_text,
    count_failure,
    extract_description,
)

CLIP_SCALE = 0.4  # cos >= 0.4 gives the full clip reward (paper)
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """Cosine similarity of texts and images under a CLIP-family model from a LOCAL folder.

    Any `transformers` model with `get_image_features` / `get_text_features` works (CLIP,
    SigLIP, FG-CLIP with trust_remote_code...). Images are preprocessed here with Pillow and
    torch from the folder's `preprocessor_config.json` (CLIP style: resize the short side, centre
    crop; SigLIP style, `size` with height/width and no crop: resize to the square), rescale by
    1/255, normalise, because the torchvision-backed processors do not import beside the CPU
    torch. Nothing is downloaded.
    """

    def __init__(self, model, tokenizer, *, image_size: int, mean, std, resize_to: int | None = None,
                 crop: bool = True, max_text_length: int = 77, pad_to_max_length: bool = False,
                 device: str = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.resize_to = int(resize_to or image_size)
        self.crop = bool(crop)
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_text_length = int(max_text_length)
        self.pad_to_max_length = bool(pad_to_max_length)  # SigLIP was trained on max-length padding
        self.device = device
        # Image features of recent images: the n responses of a GRPO group share one image
        # object, so per-response calls encode it once. Keyed by id(); the entry keeps the
        # image alive, so its id cannot be reused while cached. (Do not edit images in place.)
        self._image_cache: dict[int, tuple[object, object]] = {}
        self._image_cache_size = 64

    @classmethod
    def from_pretrained(cls, folder: str, *, device: str = "cpu", trust_remote_code: bool = False) -> "ClipScorer":
        """Load model, tokenizer and preprocessing from `folder` (local files only)."""
        from transformers import AutoModel, AutoTokenizer

        if not os.path.isdir(folder):
            raise FileNotFoundError(f"folder: no CLIP model folder at {folder!r}")
        model = AutoModel.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ValueError(f"folder: {type(model).__name__} has no get_image_features/get_text_features")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        vision = getattr(model.config, "vision_config", None)
        image_size = getattr(vision, "image_size", None) or 224
        mean, std, resize_to, crop = _OPENAI_CLIP_MEAN, _OPENAI_CLIP_STD, None, True
        pre = os.path.join(folder, "preprocessor_config.json")
        if os.path.isfile(pre):
            with open(pre, encoding="utf-8") as f:
                cfg = json.load(f)
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
            size, crop_size = cfg.get("size"), cfg.get("crop_size")
            crop = bool(cfg.get("do_center_crop", crop_size is not None))
            if isinstance(crop_size, dict):
                image_size = crop_size.get("height", image_size)
            elif isinstance(crop_size, int):
                image_size = crop_size
            if isinstance(size, dict):
                resize_to = size.get("shortest_edge") or size.get("height")
            elif isinstance(size, int):
                resize_to = size
            if not crop and resize_to:
                image_size = resize_to
        text_cfg = getattr(model.config, "text_config", None)
        max_len = getattr(text_cfg, "max_position_embeddings", None) or 77
        pad_max = "siglip" in str(getattr(model.config, "model_type", "")).lower()
        return cls(model, tokenizer, image_size=image_size, mean=mean, std=std, resize_to=resize_to, crop=crop,
                   max_text_length=max_len, pad_to_max_length=pad_max, device=device)

    def _pixels(self, images):
        import numpy as np
        import torch
        from PIL import Image

        batch = []
        for image in images:
            image = image.convert("RGB")
            if self.crop:
                w, h = image.size
                scale = self.resize_to / min(w, h)
                image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
                w, h = image.size
                left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
                image = image.crop((left, top, left + self.image_size, top + self.image_size))
            else:
                image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
            batch.append(np.asarray(image, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    @staticmethod
    def _features(out):
        import torch

        if isinstance(out, torch.Tensor):
            return out
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out[0]

    def image_features(self, images: list):
        """[len(images), D] fp32 image features (cached per image object)."""
        import torch

        missing = [im for im in images if id(im) not in self._image_cache]
        if missing:
            with torch.no_grad():
                feats = self._features(self.model.get_image_features(pixel_values=self._pixels(missing))).float()
            for im, f in zip(missing, feats):
                if len(self._image_cache) >= self._image_cache_size:
                    self._image_cache.pop(next(iter(self._image_cache)))
                self._image_cache[id(im)] = (im, f)
        return torch.stack([self._image_cache[id(im)][1] for im in images])

    def similarity(self, texts: list[str], images: list) -> list[float]:
        """cos(text_i, image_i) for each pair; `images` may hold one image for all texts
        (the group case: one prompt image, n descriptions), which is then encoded once."""
        import torch

        if len(images) not in (1, len(texts)):
            raise ValueError(f"images: expected 1 or {len(texts)} images, got {len(images)}")
        if not texts:
            return []
        with torch.no_grad():
            img = self.image_features(images)
            padding = "max_length" if self.pad_to_max_length else True
            tok = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=self.max_text_length,
                                 return_tensors="pt")
            # SigLIP pools the last position and was trained on unmasked max-length padding,
            # so it gets no attention mask (its own processor returns none).
            keys = ("input_ids",) if self.pad_to_max_length else ("input_ids", "attention_mask")
            tok = {k: v.to(self.device) for k, v in tok.items() if k in keys}
            try:
                out = self.model.get_text_features(**tok)
            except TypeError:  # remote-code models (FG-CLIP) that take input_ids only
                out = self.model.get_text_features(tok["input_ids"])
            txt = self._features(out).float()
            img = torch.nn.functional.normalize(img, dim=-1)
            txt = torch.nn.functional.normalize(txt, dim=-1)
            return (txt * img.expand_as(txt)).sum(-1).tolist()


def clip_score_to_reward(cos: float) -> float:
    """min(1, cos/0.4), clamped at 0 (the paper's scale)."""
    if not isinstance(cos, (int, float)) or math.isnan(cos):
        return 0.0
    return float(min(1.0, max(0.0, cos / CLIP_SCALE)))


def clip_reward(response: Any, image, scorer: ClipScorer, *, failures: RewardFailures | None = None) -> float:
    """`min(1, cos/0.4)` of the image description against `image` (0 without a description, or
    when the scorer raises: a scorer failure costs the response its clip term, not the run).

    image: one image, or a list of the item's images: then cos is the mean cosine of the
    description against each. Why the mean, not the first image: the prompt shows every image,
    so the description should be of all of them, and scoring the first alone would pay a
    response that ignores the rest as much as one that describes them; a mean of cosines (not the cosine to a mean
    embedding) keeps one image's score the same as before and each image's weight equal."""
    description = extract_description(response)
    if description is None:
        count_failure(failures, "not_text" if as_text(response) is None else "no_description")
        return 0.0
    if not description:
        return 0.0
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:  # nothing to compare against: no visual evidence, no clip term
        return 0.0
    try:
        # The description repeated per image: similarity pairs texts with images one to one.
        cos = scorer.similarity([description] * len(images), images)
    except Exception:
        count_failure(failures, "scorer_error")
        return 0.0
    return clip_score_to_reward(sum(cos) / len(cos))
