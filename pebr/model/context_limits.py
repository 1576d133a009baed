"""Items whose prompt cannot fit the policy's context, found before any of them is encoded.

    kept, skipped = drop_overlong(items, policy, max_new_tokens=cfg.max_new_tokens)   # RL, sampling
    kept, skipped = drop_overlong(items, policy, max_new_tokens=0, reference=True)     # warm-up SFT
    # skipped: [(item id, reason)], to log next to the loader's skipped rows
    policy = text_only_policy(folder)   # tokenizer, preprocessor, config: no weights loaded

An item's prompt is counted as `Policy.encode_prompts` builds it: the chat template around
`build_prompt(problem)` with one image placeholder per image, each expanded to that image's
token count. Only the text is tokenized; image token counts come from the image sizes through
Qwen's `smart_resize` (no pixels are touched), so checking a data set costs one tokenizer pass.
A prompt plus `max_new_tokens` over the model's position limit would fail (or allocate a
[L, L] attention mask of several GB) mid-run; such items are dropped here, counted, reported.
"""
from __future__ import annotations

import inspect
import os
import types

import torch

from engine.image import smart_resize

_IMAGE_PAD = "<|image_pad|>"
_IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"  # how Qwen-VL's template shows one image


def max_positions(model) -> int:
    """The model's position limit: config.max_position_embeddings, or its text_config's."""
    hf_config = model.config
    for c in (hf_config, getattr(hf_config, "text_config", None)):
        value = getattr(c, "max_position_embeddings", None) if c is not None else None
        if value:
            return int(value)
    raise ValueError("the model config has no max_position_embeddings (nor text_config's)")


def _prompt_text(policy, problem: str, num_images: int) -> str:
    """policy.prompt_text with `num_images` image placeholders."""
    if "num_images" in inspect.signature(policy.prompt_text).parameters:
        return policy.prompt_text(problem, num_images=num_images)
    # A Policy that only places one image: repeat its image block, as the Qwen-VL template does.
    return policy.prompt_text(problem).replace(_IMAGE_BLOCK, _IMAGE_BLOCK * num_images, 1)


def image_tokens(policy, image) -> int:
    """<|image_pad|> tokens of one PIL image under `policy.images` (from its size only).
    Raises ValueError where the processor would (aspect ratio over 200)."""
    enc = policy.images
    w, h = image.size
    rh, rw = smart_resize(h, w, factor=enc.patch_size * enc.merge_size, min_pixels=enc.min_pixels, max_pixels=enc.max_pixels)
    grid = torch.tensor([[1, rh // enc.patch_size, rw // enc.patch_size]])
    return int(enc.num_tokens(grid)[0])


def prompt_tokens(policy, item) -> int:
    """Length of `item`'s prompt in tokens, as `policy.encode_prompts([item.images], [item.problem])` makes it."""
    images = item.images
    text = _prompt_text(policy, item.problem, len(images))
    placed = text.count(_IMAGE_PAD)
    if placed != len(images):
        raise ValueError(f"the chat template placed {placed} {_IMAGE_PAD} for {len(images)} images")
    ids = policy.tokenizer(text, add_special_tokens=False).input_ids
    # Each placeholder is one (special) token, expanded to its image's token count.
    return len(ids) - placed + sum(image_tokens(policy, image) for image in images)


def drop_overlong(items: list, policy, *, max_new_tokens: int, reference: bool = False) -> tuple[list, list[tuple[str, str]]]:
    """items -> (kept items, [(item id, reason)] for those that cannot fit the model's positions).

    max_new_tokens: the response budget after the prompt (sampling and GRPO generate this many).
    reference: also count the item's reference_response and its end token, as warm-up SFT
    trains on prompt + reference (pass max_new_tokens=0 there).
    An item whose images the processor refuses (aspect ratio over 200) is dropped too. The kept
    items keep their order.
    """
    limit = max_positions(policy.model)
    kept, skipped = [], []
    for item in items:
        try:
            n = prompt_tokens(policy, item)
        except ValueError as exc:
            skipped.append((item.id, f"prompt not encodable ({exc})"))
            continue
        after = max_new_tokens
        what = f"max_new_tokens {max_new_tokens}"
        if reference:
            ref = len(policy.tokenizer(item.reference_response, add_special_tokens=False).input_ids) + 1
            after += ref
            what = f"its {ref}-token reference response" + (f" and {what}" if max_new_tokens else "")
        if n + after > limit:
            skipped.append((item.id, f"prompt is {n} tokens; with {what} that is over the model's {limit} positions"))
        else:
            kept.append(item)
    return kept, skipped


def text_only_policy(path: str | os.PathLike):
    """The Policy at HF folder `path` without its weights (config, tokenizer, preprocessor): what
    `drop_overlong` needs, for a stage that loads the full model only later. The tokenizer is set
    up as `pebr.model.policy.load_policy` sets it up (`load_tokenizer`)."""
    from pebr.model.image_encoder import ImageEncoder
    from pebr.model.policy import (
        Policy,
        adapter_base,
        is_adapter_only,
        load_model_config,
        load_tokenizer,
    )

    path = os.fspath(path)
    # a mid-stage LoRA checkpoint has its tokenizer and preprocessor, its base the model's config
    model = types.SimpleNamespace(config=load_model_config(adapter_base(path) if is_adapter_only(path) else path))
    return Policy(model=model, tokenizer=load_tokenizer(path), images=ImageEncoder.from_folder(path))
