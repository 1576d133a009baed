"""How small a difference a paired comparison can see: the power of McNemar's test (and of the
pooled label-swap test of pebr.report.paired, which is McNemar's on the summed counts) by Connor's
normal approximation.

    detectable_difference(5000, 0.30)        -> 0.0217   5,000 pairs (1,000 items x 5 seeds), 30% of them discordant
    pairs_needed(0.03, 0.40)                 -> 3487
    power_at(0.03, 5000, 0.30)               -> 0.972

The design. n pairs (items x seeds, each graded under both arms); psi, the discordance rate: the
share of pairs that one arm gets right and the other wrong. A difference in accuracy delta means
the discordant pairs split (psi + delta) / 2 for the second arm against (psi - delta) / 2. The
test statistic (gained - lost) / n has mean delta and variance (psi - delta^2) / n, and under "no
difference" variance psi / n; the two-sided test at level alpha rejects with probability

    power = Phi((sqrt(n) |delta| - z_{1 - alpha/2} sqrt(psi)) / sqrt(psi - delta^2))     (the far tail left out)

(R. G. Connor, "Sample size for testing differences in proportions for the paired-sample design",
Biometrics 43:207-211, 1987). So n = (z_{1-alpha/2} sqrt(psi) + z_{power} sqrt(psi - delta^2))^2 / delta^2
pairs are needed for delta, and the smallest delta n pairs detect solves the same equation for delta.
psi is what a pilot measures: the more the two arms agree item by item, the smaller a difference
the same items see.
"""
from __future__ import annotations

import math

from pebr.report.stats import normal_quantile

ALPHA = 0.05  # two-sided level of the test
POWER = 0.80  # chance of rejecting when the difference is there


def _check(pairs: float, discordance: float, alpha: float, power: float) -> None:
    if pairs <= 0:
        raise ValueError(f"pairs: expected > 0, got {pairs}")
    if not 0.0 <= discordance <= 1.0:
        raise ValueError(f"discordance: expected 0 <= discordance <= 1, got {discordance}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: expected 0 < alpha < 1, got {alpha}")
    if not 0.5 <= power < 1.0:
        raise ValueError(f"power: expected 0.5 <= power < 1, got {power}")


def detectable_difference(pairs: int, discordance: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest difference in accuracy `pairs` pairs detect with probability `power` at two-sided
    level `alpha`, when a share `discordance` of the pairs is discordant. inf when no difference
    can be (it would have to exceed the discordance: every discordant pair won by one arm).

    sqrt(n) delta = z_a sqrt(psi) + z_b sqrt(psi - delta^2), squared, is a quadratic in delta,

        (n + z_b^2) delta^2 - 2 z_a sqrt(n psi) delta + (z_a^2 - z_b^2) psi = 0,

    whose larger root is delta = (z_a sqrt(n psi) + z_b sqrt(psi (n - z_a^2 + z_b^2))) / (n + z_b^2)
    (z_a = z_{1 - alpha/2}, z_b = z_{power}; the larger root is the one of the unsquared equation
    for power >= 0.5)."""
    _check(pairs, discordance, alpha, power)
    za, zb = normal_quantile(1.0 - alpha / 2.0), normal_quantile(power)
    n, psi = float(pairs), float(discordance)
    inner = psi * (n - za * za + zb * zb)
    if inner < 0 or psi == 0.0:  # fewer pairs than z_a^2 - z_b^2 (~3), or arms that never differ: nothing is
        return math.inf
    delta = (za * math.sqrt(n * psi) + zb * math.sqrt(inner)) / (n + zb * zb)
    return delta if delta <= psi else math.inf


def pairs_needed(difference: float, discordance: float, *, alpha: float = ALPHA, power: float = POWER) -> int:
    """Pairs (items x seeds) needed to detect `difference` with probability `power` at two-sided
    level `alpha`: ceil((z_a sqrt(psi) + z_b sqrt(psi - delta^2))^2 / delta^2)."""
    _check(1, discordance, alpha, power)
    d = abs(float(difference))
    if not 0.0 < d <= discordance:
        raise ValueError(f"difference: expected 0 < |difference| <= discordance ({discordance}), got {difference}")
    za, zb = normal_quantile(1.0 - alpha / 2.0), normal_quantile(power)
    n = (za * math.sqrt(discordance) + zb * math.sqrt(discordance - d * d)) ** 2 / (d * d)
    return math.ceil(n - 1e-9)  # a whole number of pairs; the tolerance keeps an exact integer from rounding up


def power_at(difference: float, pairs: int, discordance: float, *, alpha: float = ALPHA) -> float:
    """The probability that `pairs` pairs reject "no difference" at two-sided level `alpha` when the
    difference is `difference` (0 where it exceeds the discordance: impossible)."""
    _check(pairs, discordance, alpha, 0.5)
    d = abs(float(difference))
    if d > discordance or discordance == 0.0:
        return 0.0
    za = normal_quantile(1.0 - alpha / 2.0)
    if d * d >= discordance:  # every discordant pair one way: the statistic has no spread
        return 1.0
    from statistics import NormalDist

    return NormalDist().cdf((math.sqrt(pairs) * d - za * math.sqrt(discordance)) / math.sqrt(discordance - d * d))


__all__ = ["ALPHA", "POWER", "detectable_difference", "pairs_needed", "power_at"]
