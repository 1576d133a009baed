"""Confidence intervals for evaluation numbers: Wilson's interval for an accuracy (k of n items
correct), Student's t interval for a mean over a few runs (seeds), and McNemar's exact test for
two models graded on the same items. Standard library only.

    wilson_interval(81, 263)          -> (0.2553.., 0.3662..)   95% by default
    mean_interval([0.31, 0.35, 0.29]) -> MeanInterval(mean=0.3167.., lo=.., hi=.., n=3, sd=..)
    mcnemar_exact(6, 1)               -> 0.125   (6 items gained, 1 lost)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


def normal_quantile(p: float) -> float:
    """The p-quantile of the standard normal (0 < p < 1): normal_quantile(0.975) = 1.95996..."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p: expected 0 < p < 1, got {p}")
    return NormalDist().inv_cdf(p)


def _two_sided(confidence: float) -> float:
    """confidence (e.g. 0.95) -> the upper quantile level 1 - (1 - confidence) / 2 (e.g. 0.975)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected 0 < confidence < 1, got {confidence}")
    return 1.0 - (1.0 - confidence) / 2.0


def wilson_interval(correct: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (lo, hi) for a binomial proportion: `correct` successes of `n` trials.

    With p = correct / n and z the (1 + confidence) / 2 quantile of the standard normal:

        centre    = (p + z^2 / (2n)) / (1 + z^2 / n)
        halfwidth = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        (lo, hi)  = (centre - halfwidth, centre + halfwidth)

    Unlike the normal ("Wald") interval p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not
    empty at p = 0 or 1 (0 of 10 -> (0, 0.278)), which matters for the small per-task-type counts
    of an eval. n = 0 (nothing measured) -> (0, 1).
    """
    correct, n = int(correct), int(n)
    if n < 0 or not 0 <= correct <= max(n, 0):
        raise ValueError(f"expected 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = normal_quantile(_two_sided(confidence))
    p = correct / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    # At p = 0 (or 1) the bound is exactly 0 (or 1); rounding would leave +-1e-17.
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return lo, hi


# ---- Student's t

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom:
    for t >= 0, 1 - I_{df / (df + t^2)}(df / 2, 1 / 2) / 2 (I: regularized incomplete beta); symmetric."""
    if df <= 0:
        raise ValueError(f"df: expected > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (t_{0.975, 2} = 4.3027,
    t_{0.975, 4} = 2.7764): the root of t_cdf(t, df) = p, found by bisection to 1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p: expected 0 < p < 1, got {p}")
    if df <= 0:
        raise ValueError(f"df: expected > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # the t tail is heavy: t_{0.9995, 1} = 636.6
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class MeanInterval:
    """A mean with its t interval; lo and hi are nan when n < 2 (one run says nothing of the spread)."""

    mean: float  # average of the values (nan when there are none)
    lo: float  # mean - t * sd / sqrt(n)
    hi: float  # mean + t * sd / sqrt(n)
    n: int  # number of values (runs, seeds)
    sd: float  # sample standard deviation (divisor n - 1); nan when n < 2

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "sd": self.sd}


def mean_interval(values, *, confidence: float = 0.95) -> MeanInterval:
    """Mean of `values` (e.g. one accuracy per seed) with Student's t interval:

        mean +- t_{(1 + confidence) / 2, n - 1} * s / sqrt(n),   s^2 = sum (x - mean)^2 / (n - 1)

    It assumes the values are independent draws of a roughly normal quantity; with 2 or 3 seeds
    the t quantile (12.7 or 4.30 at 95%) makes the interval honest about how little they say."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return MeanInterval(math.nan, math.nan, math.nan, 0, math.nan)
    mean = math.fsum(xs) / n
    if n < 2:
        return MeanInterval(mean, math.nan, math.nan, 1, math.nan)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(_two_sided(confidence), n - 1) * sd / math.sqrt(n)
    return MeanInterval(mean, mean - half, mean + half, n, sd)


# ---- paired: two models on the same items


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value for two models graded on the same items.

    gained: items the second model gets right and the first wrong; lost: the reverse. Items both get
    right or both wrong say nothing about which is better. Under "no difference" each of the
    d = gained + lost discordant items is a fair coin, so the p-value is

        min(1, 2 * P[X <= min(gained, lost)]),   X ~ Binomial(d, 1/2)

    Two Wilson intervals that overlap can still hide a real difference: the same items make the two
    accuracies move together, and this test uses that. d = 0 -> 1.0."""
    gained, lost = int(gained), int(lost)
    if gained < 0 or lost < 0:
        raise ValueError(f"expected counts >= 0, got gained={gained}, lost={lost}")
    d, k = gained + lost, min(gained, lost)
    if d == 0:
        return 1.0
    # log-space terms: exact for any d without overflowing 2**d
    logs = [math.lgamma(d + 1) - math.lgamma(x + 1) - math.lgamma(d - x + 1) - d * math.log(2.0) for x in range(k + 1)]
    return min(1.0, 2.0 * math.fsum(math.exp(v) for v in logs))


__all__ = ["normal_quantile", "wilson_interval", "t_cdf", "t_quantile", "MeanInterval", "mean_interval", "mcnemar_exact"]
