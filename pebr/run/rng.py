"""Every random number generator a run draws from, as a checkpoint saves and restores it.

    state = rng_state()          # tensors and plain data: loads with torch.load(weights_only=True)
    set_rng_state(state)
"""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """Every RNG a run draws from: Python, NumPy, torch CPU (and CUDA where present), as tensors
    and plain data, so a checkpoint's RNG file loads with torch.load(weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned (or, from older checkpoints, the raw getstate() tuples)."""
    py = state["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"])
    random.setstate(py)
    nps = state["numpy"]
    if isinstance(nps, dict):
        nps = (nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    np.random.set_state(nps)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
