"""The order a stage reads its items in: reproducible from a seed, resumable from one integer."""
from __future__ import annotations

import torch


class DataOrder:
    """A reproducible stream of item indices: a fresh permutation of range(n) per epoch from `seed`.

    `position` (items consumed so far) is all the state: a resumed run sees the same order.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, position: int = 0):
        if n < 1:
            raise ValueError(f"the data holds no items (n={n})")
        self.n, self.seed, self.shuffle, self.position = n, seed, shuffle, position
        self._epoch, self._perm = -1, None

    @property
    def epoch(self) -> int:
        return self.position // self.n

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
            self._epoch = epoch
        return self._perm

    def take(self, k: int) -> list[int]:
        """The next k indices (wrapping into the next epoch's permutation)."""
        out = []
        for _ in range(k):
            out.append(self._order(self.position // self.n)[self.position % self.n])
            self.position += 1
        return out
