"""The items every command reads, loaded one way: a --data file (bad rows skipped, counted and
logged) or the built-in procedural tasks, then (for training) those that fit the model's context.

    items = load_items(cfg, purpose="rl")                       # pebr.train, pebr.experiment
    items = read_items(data, num_items=128, seed=1, kind="mixed", difficulty="simple", log=print)
"""
from __future__ import annotations

import logging
from typing import Callable

from pebr.data import tasks
from pebr.data.records import load_record_file
from pebr.errors import DataError
from pebr.recipe.config import TrainConfig

SFT_SEED = 2  # procedural warm-up items: a pool of their own (sampling uses cfg.sampling.seed, eval 999)

log = logging.getLogger("pebr")


def read_items(data: str | None, *, num_items: int, seed: int, kind: str = "mixed", difficulty: str = "standard",
               image_size: int = 112, log: Callable[[str], None] = log.info) -> list:
    """The records of `data` (each skipped row logged) or, without it, `num_items` built-in items
    of `kind` and `difficulty` drawn from `seed`, with `image_size`-pixel images. DataError when
    there is no usable item."""
    if data:
        res = load_record_file(data)
        log(f"data {data}: {res.summary()}")
        for row, why in res.skipped:
            log(f"  skipped row {row}: {why}")
        if not res.items:
            raise DataError(f"no usable rows in {data}")
        return res.items
    items = tasks.generate_items(num_items, seed=seed, kind=kind, difficulty=difficulty, image_size=image_size)
    if not items:
        raise DataError("no items: --num-items is 0")
    return items


def load_items(cfg: TrainConfig, *, purpose: str) -> list:
    """The items of a training stage: `purpose` "sft" (the warm-up's pool) or "rl" (the pool that
    dataset-level sampling splits); --data replaces both."""
    if purpose not in ("sft", "rl"):
        raise ValueError(f"purpose must be 'sft' or 'rl', got {purpose!r}")
    size = cfg.item_image_size
    if purpose == "sft":
        return read_items(cfg.data, num_items=cfg.sft.num_items, seed=SFT_SEED, difficulty=cfg.difficulty, image_size=size)
    return read_items(cfg.data, num_items=cfg.sampling.num_items, seed=cfg.sampling.seed, difficulty=cfg.difficulty,
                      image_size=size)


def fit_context(items: list, policy, *, max_new_tokens: int, reference: bool = False) -> list:
    """The items whose prompt (plus the response budget, or the reference response for the
    warm-up) fits the model's positions; the others are dropped, counted and logged. DataError
    when none fits."""
    from pebr.model.context_limits import drop_overlong

    kept, dropped = drop_overlong(items, policy, max_new_tokens=max_new_tokens, reference=reference)
    if dropped:
        log.info(f"{len(dropped)} of {len(items)} items do not fit the model's context and are left out")
        for item_id, why in dropped[:20]:
            log.info(f"  dropped {item_id}: {why}")
    if not kept:
        raise DataError("no item fits the model's context (see the log for each item's length)")
    return kept
