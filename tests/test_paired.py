"""pebr.report.paired: the pooled paired test against the label-swap permutation test enumerated
swap by swap (every one of the 2^pairs relabellings), hand-worked p-values, its reduction to
McNemar's test for one seed, and the bootstrap interval against the standard error of a mean over
items written out by hand."""
import itertools
import math
import random

import numpy as np
import pytest

from pebr.report.paired import bootstrap_interval, compare, discordant, pooled_exact_p
from pebr.report.stats import mcnemar_exact


def _seed_outcomes(pairs: list[tuple[int, int]], prefix: str = "i") -> tuple[dict, dict]:
    """[(first correct, second correct)] of one seed -> ({id: first}, {id: second})."""
    first = {f"{prefix}{k}": bool(a) for k, (a, _) in enumerate(pairs)}
    second = {f"{prefix}{k}": bool(b) for k, (_, b) in enumerate(pairs)}
    return first, second


def _design(seeds: list[list[tuple[int, int]]]) -> tuple[list[dict], list[dict]]:
    out = [_seed_outcomes(s) for s in seeds]  # the same item ids in every seed, as the ablation has them
    return [f for f, _ in out], [s for _, s in out]


def _label_swap_p(seeds: list[list[tuple[int, int]]]) -> float:
    """The permutation test written out: every way of swapping the two arms' labels pair by pair
    (2^pairs relabellings, concordant pairs included), the statistic sum(second - first) over all
    pairs of all seeds, p = the share of relabellings at least as far from 0 as the observed one."""
    pairs = [p for s in seeds for p in s]
    observed = abs(sum(b - a for a, b in pairs))
    extreme = 0
    for swaps in itertools.product((False, True), repeat=len(pairs)):
        t = sum((a - b) if sw else (b - a) for (a, b), sw in zip(pairs, swaps))
        extreme += abs(t) >= observed
    return extreme / 2 ** len(pairs)


# Hand-worked: X ~ Binomial(D, 1/2), two-sided p = 2 P(X <= min(gained, lost)), capped at 1.
HAND = [
    # one seed, 6 gained and 1 lost among 10 pairs: 2 (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128
    ([[(0, 1)] * 6 + [(1, 0)] + [(1, 1)] * 2 + [(0, 0)]], 0.125),
    # two seeds, 3 + 2 gained, none lost: 2 / 2^5; each seed alone 2 / 2^3 and 2 / 2^2
    ([[(0, 1)] * 3 + [(1, 1)], [(0, 1)] * 2 + [(0, 0)] * 2], 0.0625),
    # two seeds pulling opposite ways: 4 gained in one, 4 lost in the other -> sum 0, p = 1
    ([[(0, 1)] * 4 + [(1, 1)], [(1, 0)] * 4 + [(0, 0)]], 1.0),
    # three seeds (2, 1), (3, 0), (1, 0): 6 gained, 1 lost in all, as one seed's (6, 1): 0.125
    ([[(0, 1), (0, 1), (1, 0), (0, 0)], [(0, 1)] * 3, [(0, 1), (1, 1)]], 0.125),
]


@pytest.mark.parametrize("seeds, p", HAND)
def test_pooled_p_of_hand_worked_tables(seeds, p):
    first, second = _design(seeds)
    got = compare(first, second, resamples=200)
    assert got["p"] == pytest.approx(p, rel=1e-12)
    assert got["p"] == pytest.approx(_label_swap_p(seeds), rel=1e-12)
    n = sum(len(s) for s in seeds)
    gained = sum(b > a for s in seeds for a, b in s)
    lost = sum(a > b for s in seeds for a, b in s)
    assert (got["n"], got["gained"], got["lost"], got["seeds"]) == (n, gained, lost, len(seeds))
    assert got["diff"] == pytest.approx((gained - lost) / n)


def test_per_seed_p_is_mcnemar_of_hand_worked_tables():
    seeds = HAND[1][0]
    got = compare(*_design(seeds), resamples=200)
    assert [r["p"] for r in got["per_seed"]] == pytest.approx([2 / 8, 2 / 4])  # 3 of 3 and 2 of 2 gained
    assert [(r["n"], r["gained"], r["lost"]) for r in got["per_seed"]] == [(4, 3, 0), (4, 2, 0)]
    assert [r["diff"] for r in got["per_seed"]] == pytest.approx([3 / 4, 2 / 4])


def test_pooled_test_is_the_enumerated_label_swap_test_on_fresh_tables():
    rng = random.Random()
    for _ in range(12):
        seeds = [[(rng.randint(0, 1), rng.randint(0, 1)) for _ in range(rng.randint(1, 5))]
                 for _ in range(rng.randint(1, 3))]
        while sum(len(s) for s in seeds) > 13:  # 2^13 relabellings at most
            seeds[-1].pop()
        got = compare(*_design(seeds), resamples=100)
        assert got["p"] == pytest.approx(_label_swap_p(seeds), rel=1e-12), seeds
        for s, r in zip(seeds, got["per_seed"]):
            assert r["p"] == pytest.approx(_label_swap_p([s]), rel=1e-12), s


def test_one_seed_reduces_to_mcnemar():
    rng = random.Random()
    for _ in range(20):
        pairs = [(rng.randint(0, 1), rng.randint(0, 1)) for _ in range(rng.randint(1, 400))]
        got = compare(*_design([pairs]), resamples=100)
        g = sum(b > a for a, b in pairs)
        l = sum(a > b for a, b in pairs)
        assert got["p"] == got["per_seed"][0]["p"] == pytest.approx(mcnemar_exact(g, l), rel=1e-12)
        assert (got["gained"], got["lost"], got["n"]) == (g, l, len(pairs))
        assert (got["lo"], got["hi"]) == (got["per_seed"][0]["lo"], got["per_seed"][0]["hi"])
    assert pooled_exact_p([(6, 1)]) == pytest.approx(0.125)  # the hand value again, through the counts


def test_only_items_graded_under_both_are_pairs():
    first = {"x": True, "y": False, "z": False, "w": True}
    second = {"x": False, "y": True, "q": True}  # z and w missing, q extra
    assert discordant(first, second) == (2, 1, 1)
    assert discordant(first, second, ids=["y", "q", "w"]) == (1, 1, 0)
    got = compare([first], [second], ids=["y", "z"], resamples=50)
    assert (got["n"], got["gained"], got["lost"]) == (1, 1, 0)
    empty = compare([first], [second], ids=["nothing"], resamples=50)
    assert empty["n"] == 0 and empty["p"] == 1.0 and math.isnan(empty["diff"]) and math.isnan(empty["lo"])
    with pytest.raises(ValueError, match="per seed"):
        compare([first, first], [second])


def test_bootstrap_of_degenerate_tables():
    same = _design([[(1, 1), (0, 0)] * 5] * 3)
    assert bootstrap_interval(*same, resamples=200) == (0.0, 0.0)
    won = _design([[(0, 1)] * 7] * 2)
    assert bootstrap_interval(*won, resamples=200) == (1.0, 1.0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(*won, confidence=1.0)


def test_bootstrap_interval_matches_the_clustered_standard_error():
    """Items resampled with their pairs in every seed: for N items each in all S seeds, the pooled
    difference is mean_i(t_i) / S with t_i the item's sum of (second - first) over seeds, so its
    standard error is sd(t_i) / (S sqrt(N)), and the 95% interval about +-1.96 of it. The items'
    outcomes are made to repeat across seeds, so the standard error that treats the seeds' pairs as
    independent is far smaller: the interval must follow the clustered one."""
    rng = np.random.default_rng()
    n_items, n_seeds = 600, 4
    p_first = rng.uniform(0.05, 0.95, size=n_items)  # each item's own difficulty, shared by the seeds
    lift = rng.uniform(-0.4, 0.6, size=n_items)      # and its own leaning towards the second arm
    p_second = np.clip(p_first + lift, 0.0, 1.0)
    u = rng.random((n_seeds, n_items))               # one draw per (seed, item) for both arms: correlated pairs
    x = (u < p_first).astype(int)
    y = (u < p_second).astype(int)
    first = [{f"i{k}": bool(x[s, k]) for k in range(n_items)} for s in range(n_seeds)]
    second = [{f"i{k}": bool(y[s, k]) for k in range(n_items)} for s in range(n_seeds)]
    t = (y - x).sum(axis=0)
    diff = t.mean() / n_seeds
    se = t.std(ddof=1) / (n_seeds * math.sqrt(n_items))
    se_independent = math.sqrt(sum((y[s] - x[s]).var(ddof=1) for s in range(n_seeds)) / n_items) / n_seeds
    assert se > 1.3 * se_independent  # the design does separate the two
    got = compare(first, second)
    assert got["diff"] == pytest.approx(diff, abs=1e-12)
    lo, hi = got["lo"], got["hi"]
    assert (hi - lo) / 2 == pytest.approx(1.959964 * se, rel=0.08)
    assert (lo + hi) / 2 == pytest.approx(diff, abs=0.3 * se)
    # each seed alone: the ordinary bootstrap over that seed's items, +-1.96 sd(d) / sqrt(N)
    for s, r in enumerate(got["per_seed"]):
        d = y[s] - x[s]
        assert (r["hi"] - r["lo"]) / 2 == pytest.approx(1.959964 * d.std(ddof=1) / math.sqrt(n_items), rel=0.1)
    # over seeds: the mean of the per-seed differences
    assert got["over_seeds"]["mean"] == pytest.approx(np.mean([(y[s] - x[s]).mean() for s in range(n_seeds)]))
    assert got["over_seeds"]["n"] == n_seeds


def test_bootstrap_is_reproducible():
    a, b = _design([[(random.randint(0, 1), random.randint(0, 1)) for _ in range(50)] for _ in range(2)])
    assert bootstrap_interval(a, b) == bootstrap_interval(a, b)  # a fixed stream: a report reads the same twice
