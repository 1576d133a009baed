"""Every use of transformers' internals, in one place, with the versions it was checked against.

The recipe leans on a few things transformers does not promise to keep: the keyword a model's
forward takes its key/value cache under, the field a forward returns it in, a cache's in-place
row repetition, the switch for activation checkpointing, and generate's position-id preparation
(mrope for Qwen2/2.5-VL). Each has one function here; a transformers that lacks one makes the
caller take its plain path (and say why) rather than fail deep inside a step.

Checked against transformers 5.17 (the GPU machine) through 5.24 (requirements.txt's pin).
"""
from __future__ import annotations

import inspect

import torch

TESTED_TRANSFORMERS = (">=5.17", "<=5.24")


def cache_kwarg(module) -> str | None:
    """The keyword `module.forward` takes the key/value cache under: transformers 5.x renamed
    `past_key_values` to `cache` (the old name deprecated); None if it takes neither."""
    params = inspect.signature(module.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def output_cache(outputs, model=None):
    """The key/value cache a forward with use_cache=True returned (`cache` in 5.x, `past_key_values`
    before). RuntimeError naming the model when there is none."""
    cache = getattr(outputs, "cache", None)
    if cache is None:
        cache = getattr(outputs, "past_key_values", None)
    if cache is None:
        raise RuntimeError(f"{type(model).__name__ if model is not None else 'the model'} returned no key/value cache")
    return cache


def repeat_cache(cache, n: int):
    """Each of a cache's P rows repeated n times, in place (rows p*n .. p*n+n-1) -> the cache."""
    if n > 1:
        cache.batch_repeat_interleave(n)
    return cache


def is_activation_checkpointing(model) -> bool:
    """Whether the model recomputes its layers in backward (transformers >= 5.x names the flag
    `is_activation_checkpointing`, older ones `is_gradient_checkpointing`)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def enable_activation_checkpointing(model) -> None:
    """Recompute decoder layers and vision blocks in backward (non-reentrant, so frozen inputs work)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def has_generation_positions(model) -> bool:
    """Whether `generation_positions` can ask the model for the positions generate would use."""
    return hasattr(model, "_prepare_position_ids_for_generation")


def generation_positions(model, input_ids: torch.Tensor, **model_kwargs) -> torch.Tensor:
    """The position ids generate gives these prompts (text positions, plus mrope rows for a
    Qwen2/2.5-VL model): [P, L], or [3 or 4, P, L]."""
    return model._prepare_position_ids_for_generation(input_ids, model_kwargs)


def generation_cache_implementation(model) -> str | None:
    """The cache implementation the model's generation config names (None: generate's default)."""
    return getattr(getattr(model, "generation_config", None), "cache_implementation", None)
