"""Two arms graded on the same items, over several seeds: the discordant pairs and McNemar's exact
test per seed, one exact test pooled over the seeds, and the difference in accuracy with a bootstrap
interval. numpy for the bootstrap; the tests themselves are pebr.report.stats.mcnemar_exact.

    first  = [{"item-1": True, "item-2": False, ...}, ...]   # arm a: one dict per seed, item id -> correct
    second = [{"item-1": True, "item-2": True, ...}, ...]    # arm b, the same seeds in the same order
    compare(first, second)  -> {"diff": +0.021, "lo": .., "hi": .., "p": .., "gained": .., "lost": .., "per_seed": [..]}

The pooled test. Within a seed, an item graded under both arms is a matched pair; an item both get
right or both get wrong says nothing about which arm is better. Under "the arms do not differ",
which arm's answer is which could be swapped, pair by pair, without changing the distribution of
what we see: a permutation test that swaps the two labels of each (seed, item) pair independently.
Its statistic, the total gained - lost over all seeds, moves only on discordant pairs, each +1 or -1
with probability 1/2, so its exact permutation distribution is that of 2 X - D with
X ~ Binomial(D, 1/2), D the discordant pairs of all seeds together: the exact test is McNemar's on
the summed counts. It is also the Mantel-Haenszel test for matched pairs stratified by seed: with
each pair its own stratum, the Mantel-Haenszel statistic is McNemar's on the summed discordant
counts, and its exact conditional version is this binomial tail. So the two tests the ablation could
use are one test here, computed exactly (no Monte Carlo), and with one seed it is McNemar's.

What it does not see: how much the arms' difference varies from seed to seed. Its null is about
these trained policies on the population of items; `over_seeds` (a t interval of the per-seed
differences) is reported beside it for that.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pebr.report.stats import mcnemar_exact, mean_interval

DEFAULT_BOOTSTRAP = 10_000  # resamples: the percentile bounds move by well under 0.001 between runs at this count
BOOTSTRAP_SEED = 0  # a fixed stream, so a report read twice gives the same interval


def discordant(first: Mapping[str, bool], second: Mapping[str, bool], ids=None) -> tuple[int, int, int]:
    """Items graded under both -> (n, gained, lost).

    first, second: item id -> correct, of the two arms (or checkpoints) on the same items.
    ids: only these ids (default: every id of `first`); an id missing from either side is not a pair.
    gained: right under `second` and wrong under `first`; lost: the reverse."""
    n = gained = lost = 0
    for i in first if ids is None else ids:
        if i not in first or i not in second:
            continue
        a, b = bool(first[i]), bool(second[i])
        n += 1
        gained += b and not a
        lost += a and not b
    return n, gained, lost


def pooled_exact_p(tables: Sequence[tuple[int, int]]) -> float:
    """[(gained, lost) per seed] -> the two-sided exact p of the label-swap test pooled over the
    seeds, which is McNemar's exact test on the summed counts (the module docstring says why)."""
    gained = sum(int(g) for g, _ in tables)
    lost = sum(int(l) for _, l in tables)
    return mcnemar_exact(gained, lost)


def bootstrap_interval(first: Sequence[Mapping[str, bool]], second: Sequence[Mapping[str, bool]], *,
                       ids=None, confidence: float = 0.95, resamples: int = DEFAULT_BOOTSTRAP,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval (lo, hi) of the pooled difference in accuracy, second - first.

    Items are resampled, each with its pairs in every seed: the same items are graded in every seed,
    so an item one arm gets and the other misses in seed 0 is likely to do so in seed 1 too;
    resampling the item as one keeps that (resampling each seed's items apart would treat the seeds'
    pairs of one item as independent and narrow the interval). With one seed it is the ordinary
    bootstrap over items. The pooled difference of a resample is sum over its items of
    (correct under second - correct under first, summed over seeds) / (its pairs). Only an item's
    (sum, pairs) matters, so a resample is drawn as multinomial counts of those few distinct values,
    exactly as drawing N items with replacement would give them. No pairs -> (nan, nan)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected 0 < confidence < 1, got {confidence}")
    per_item: dict[str, list[int]] = {}  # id -> [sum of (second - first) over seeds, pairs]
    for f, s in zip(first, second, strict=True):
        for i in (f if ids is None else ids):
            if i in f and i in s:
                acc = per_item.setdefault(i, [0, 0])
                acc[0] += int(bool(s[i])) - int(bool(f[i]))
                acc[1] += 1
    if not per_item:
        return float("nan"), float("nan")
    values, counts = np.unique(np.array(list(per_item.values()), dtype=np.int64), axis=0, return_counts=True)
    n_items = int(counts.sum())
    draws = np.random.default_rng(seed).multinomial(n_items, counts / n_items, size=int(resamples))  # [R, distinct]
    diffs = (draws @ values[:, 0]) / (draws @ values[:, 1])
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(diffs, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _summary(n: int, gained: int, lost: int, p: float, lo: float, hi: float) -> dict:
    return {"n": n, "gained": gained, "lost": lost, "diff": (gained - lost) / n if n else float("nan"),
            "lo": lo, "hi": hi, "p": p}


def compare(first: Sequence[Mapping[str, bool]], second: Sequence[Mapping[str, bool]], *, ids=None,
            confidence: float = 0.95, resamples: int = DEFAULT_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """Arm `second` against arm `first`, seed by seed and pooled.

    first, second: one {item id: correct} per seed, the seeds in the same order; ids: only these
    items (a kind, a task type; default: all of each seed's `first`). ->

        {"n", "gained", "lost", "diff", "lo", "hi", "p",        pooled over the seeds
         "seeds": S, "per_seed": [{"n", "gained", "lost", "diff", "lo", "hi", "p"}, ...],
         "over_seeds": {"mean", "lo", "hi", "n", "sd"}}

    n: pairs (items graded under both, summed over seeds); diff = (gained - lost) / n, the difference
    in accuracy second - first; [lo, hi] the bootstrap interval over items (bootstrap_interval);
    p: per seed McNemar's exact test, pooled the exact label-swap test (pooled_exact_p).
    over_seeds: the per-seed differences' mean with a Student t interval (n - 1 degrees of freedom),
    which carries the seed-to-seed spread the pooled test leaves out."""
    if len(first) != len(second):
        raise ValueError(f"expected one outcome dict per seed on both sides, got {len(first)} and {len(second)}")
    per_seed = []
    for f, s in zip(first, second):
        n, g, l = discordant(f, s, ids)
        lo, hi = bootstrap_interval([f], [s], ids=ids, confidence=confidence, resamples=resamples, seed=seed)
        per_seed.append(_summary(n, g, l, mcnemar_exact(g, l), lo, hi))
    n, g, l = (sum(r[k] for r in per_seed) for k in ("n", "gained", "lost"))
    lo, hi = bootstrap_interval(first, second, ids=ids, confidence=confidence, resamples=resamples, seed=seed)
    pooled = _summary(n, g, l, pooled_exact_p([(r["gained"], r["lost"]) for r in per_seed]), lo, hi)
    seed_diffs = [r["diff"] for r in per_seed if r["n"]]
    return {**pooled, "seeds": len(per_seed), "per_seed": per_seed,
            "over_seeds": mean_interval(seed_diffs, confidence=confidence).to_dict()}


__all__ = ["discordant", "pooled_exact_p", "bootstrap_interval", "compare", "DEFAULT_BOOTSTRAP"]
