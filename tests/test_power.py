"""pebr.report.power: the smallest detectable difference and the pairs needed against values worked
out by hand from Connor's equation (by fixed-point iteration, not the closed form the module
uses), and against the pooled exact test itself: at the difference the statement names, simulated
experiments reject "no difference" about 80% of the time."""
import functools
import math
import random

import numpy as np
import pytest

from pebr.report.paired import pooled_exact_p
from pebr.report.power import detectable_difference, pairs_needed, power_at

ZA, ZB = 1.959963984540054, 0.8416212335729143  # z_{0.975} and z_{0.80}, from tables


def _by_iteration(pairs: int, psi: float) -> float:
    """sqrt(n) delta = z_a sqrt(psi) + z_b sqrt(psi - delta^2), iterated from delta = 0."""
    d = 0.0
    for _ in range(100):
        d = (ZA * math.sqrt(psi) + ZB * math.sqrt(psi - d * d)) / math.sqrt(pairs)
    return d


# By hand, n = 5,000 pairs, psi = 0.30: z_a sqrt(psi) = 1.959964 x 0.547723 = 1.073513;
# delta_0 = (1.073513 + 0.841621 x 0.547723) / sqrt(5000) = 1.534485 / 70.710678 = 0.021701;
# delta_1: sqrt(0.30 - 0.021701^2) = 0.547293, (1.073513 + 0.460610) / 70.710678 = 0.021696; it stays there.
DETECTABLE = [(5000, 0.30, 0.021696), (1000, 0.50, 0.062572), (5250, 0.53, 0.028143), (200, 0.10, 0.062277)]
# n = (z_a sqrt(psi) + z_b sqrt(psi - delta^2))^2 / delta^2, e.g. delta 0.03, psi 0.40:
# (1.959964 x 0.632456 + 0.841621 x sqrt(0.3991)) ^ 2 / 0.0009 = (1.239590 + 0.531685)^2 / 0.0009 = 3486.03 -> 3,487
NEEDED = [(0.03, 0.40, 3487), (0.03, 0.53, 4620), (0.05, 0.20, 626), (0.10, 0.10, 77)]


@pytest.mark.parametrize("pairs, psi, delta", DETECTABLE)
def test_detectable_difference_of_hand_worked_cases(pairs, psi, delta):
    assert detectable_difference(pairs, psi) == pytest.approx(delta, abs=2e-6)
    assert power_at(delta, pairs, psi) == pytest.approx(0.80, abs=1e-4)


@pytest.mark.parametrize("delta, psi, n", NEEDED)
def test_pairs_needed_of_hand_worked_cases(delta, psi, n):
    assert pairs_needed(delta, psi) == n
    assert power_at(delta, n, psi) >= 0.80 > power_at(delta, n - 1, psi)


def test_on_fresh_designs_and_inverse():
    rng = random.Random()
    for _ in range(200):
        pairs, psi = rng.randint(20, 100_000), rng.uniform(0.02, 1.0)
        d = detectable_difference(pairs, psi)
        if math.isinf(d):
            assert _by_iteration(pairs, psi) > psi  # no difference within the discordance is detected
            continue
        assert d == pytest.approx(_by_iteration(pairs, psi), rel=1e-9)
        assert pairs_needed(d, psi) in (pairs, pairs + 1)  # ceil of a float that is pairs up to rounding
        # more pairs, a smaller difference; more discordance, a larger one
        assert detectable_difference(pairs * 4, psi) < d
        assert detectable_difference(pairs, min(1.0, psi * 1.5)) >= d or psi * 1.5 > 1.0


def test_power_of_the_pooled_test_at_the_stated_difference():
    """Simulated experiments of 1,500 pairs at discordance 0.40: discordant pairs won by the second
    arm with probability (psi + delta) / 2, lost with (psi - delta) / 2; the pooled exact test at
    0.05 should reject about 80% of them at the stated delta and at most 5% at delta = 0."""
    rng = np.random.default_rng()
    pairs, psi = 1500, 0.40
    delta = detectable_difference(pairs, psi)
    p_of = functools.lru_cache(maxsize=None)(lambda g, l: pooled_exact_p([(g, l)]))  # draws repeat counts

    def rejected(d: float, runs: int) -> float:
        draws = rng.multinomial(pairs, [(psi + d) / 2, (psi - d) / 2, 1 - psi], size=runs)
        return float(np.mean([p_of(int(g), int(l)) < 0.05 for g, l, _ in draws]))

    # the exact test is a little conservative (discrete): 0.788 in 40,000 runs; 3,000 runs have sd 0.0075
    assert rejected(delta, 3000) == pytest.approx(0.80, abs=0.04)
    assert rejected(0.0, 1500) <= 0.05 + 0.02  # the exact test keeps its level (noise of 1,500 runs: 0.006)


def test_edges_and_bad_input():
    assert math.isinf(detectable_difference(2, 0.5))  # 2 pairs detect nothing
    assert math.isinf(detectable_difference(30, 0.01))  # 0.3 discordant pairs expected: nothing to see
    assert power_at(0.5, 100, 0.2) == 0.0  # more than the discordance: impossible
    assert math.isinf(detectable_difference(1000, 0.0)) and power_at(0.01, 1000, 0.0) == 0.0  # arms never differ
    for bad in ((0, 0.3), (100, -0.1), (100, 1.5)):
        with pytest.raises(ValueError):
            detectable_difference(*bad)
    with pytest.raises(ValueError, match="difference"):
        pairs_needed(0.3, 0.2)
    with pytest.raises(ValueError, match="power"):
        detectable_difference(100, 0.3, power=0.3)
