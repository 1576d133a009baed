"""A key/value cache that is written in place instead of grown by concatenation.

transformers' `DynamicLayer.update` appends each decode step's keys and values with
`torch.cat`, which copies the whole cache every step: for a rollout of 128 rows that decodes 96
tokens after a 73-token prompt, `aten::cat` was 70% of `generate`'s CPU time under the torch
profiler (Xeon AVX-512, 1 thread; the profiler inflates it: without it, this layer and the
Gumbel-max draw of pebr/rollout/hf_engine.py together cut the rollout's time per decoded token by about
10%, bench/RESULTS.md). `PreallocatedLayer` keeps each layer's keys and values
in one buffer sized for the prompt plus the response budget and hands attention a view of the
filled part: the same values, in the same order, so the tokens sampled are unchanged.

    cache = prefill(...).past_key_values            # a DynamicCache over the prompt
    preallocate(cache, extra_tokens=max_new_tokens) # each plain DynamicLayer -> PreallocatedLayer

Only plain `DynamicLayer`s are replaced (sliding-window or other layer kinds stay as they are),
and nothing happens on a transformers without per-layer caches (before 4.56).
"""
from __future__ import annotations

import torch

try:  # transformers >= 4.56: caches are lists of layers
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - older transformers: the cache is left as it is
    DynamicLayer = None


if DynamicLayer is not None:

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer whose keys/values [B, H, S, D] are views of buffers [B, H, capacity, D]
        filled in place; past the capacity the buffers double (one copy), so any length works."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = int(capacity)
            self._keys_buf: torch.Tensor | None = None
            self._values_buf: torch.Tensor | None = None
            self._len = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device = key_states.device
            self._allocate(key_states, value_states, max(self.capacity, key_states.shape[-2]))
            self.is_initialized = True

        def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
            """(Re)allocate the buffers for `capacity` positions, keeping what they hold."""
            B, H, _, Dk = key_states.shape
            keys = key_states.new_empty((B, H, capacity, Dk))
            values = value_states.new_empty((B, H, capacity, value_states.shape[-1]))
            if self._len:
                keys[:, :, : self._len].copy_(self._keys_buf[:, :, : self._len])
                values[:, :, : self._len].copy_(self._values_buf[:, :, : self._len])
            self._keys_buf, self._values_buf, self.capacity = keys, values, capacity
            self._views()

        def _views(self) -> None:
            self.keys = self._keys_buf[:, :, : self._len]
            self.values = self._values_buf[:, :, : self._len]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self._len + key_states.shape[-2]
            if end > self.capacity:
                self._allocate(key_states, value_states, max(end, 2 * self.capacity))
            self._keys_buf[:, :, self._len : end].copy_(key_states)
            self._values_buf[:, :, self._len : end].copy_(value_states)
            self._len = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._len if self.is_initialized else 0

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:  # the same contract as DynamicLayer.crop
                raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
            if tokens_to_remove and self.is_initialized:
                self._len = max(0, self._len + tokens_to_remove)
                self._views()

        def _rebuild(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Buffers for new rows (a batch change), holding `keys`/`values` and room to grow."""
            self._keys_buf = self._values_buf = None
            self._len = 0
            self._allocate(keys, values, max(self.capacity, keys.shape[-2]))
            self._len = keys.shape[-2]
            self._keys_buf[:, :, : self._len].copy_(keys)
            self._values_buf[:, :, : self._len].copy_(values)
            self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.get_seq_length() > 0:
                self._rebuild(self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.get_seq_length() > 0:
                self._rebuild(self.keys[indices, ...], self.values[indices, ...])

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if self.get_seq_length() > 0:
                beam_idx = beam_idx.to(self.keys.device)
                self._rebuild(self.keys.index_select(0, beam_idx), self.values.index_select(0, beam_idx))

        def offload(self):  # moving a view would detach it from its buffer: not supported, stay put
            return

        def reset(self) -> None:
            self._keys_buf = self._values_buf = None
            self._len = 0
            self.keys = self.values = None
            self.is_initialized = False
else:  # pragma: no cover
    PreallocatedLayer = None


def preallocate(cache, *, extra_tokens: int) -> int:
    """Replace each filled plain DynamicLayer of `cache` (in place) by a PreallocatedLayer holding
    the same keys/values with room for `extra_tokens` more positions -> how many layers were
    replaced (0: not a per-layer cache, or no plain dynamic layer)."""
    layers = getattr(cache, "layers", None)
    if PreallocatedLayer is None or not isinstance(layers, list):
        return 0
    replaced = 0
    for i, layer in enumerate(layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.get_seq_length() == 0:
            continue
        new = PreallocatedLayer(layer.get_seq_length() + int(extra_tokens))
        new.update(layer.keys, layer.values)
        layers[i] = new
        replaced += 1
    return replaced


__all__ = ["PreallocatedLayer", "preallocate"]
