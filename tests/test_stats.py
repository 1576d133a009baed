"""pebr.report.stats: Wilson's interval against the textbook quadratic and published values; Student's t
quantiles against tables and the closed-form CDFs of 1 and 2 degrees of freedom; McNemar's exact
test against the binomial tail enumerated in rationals."""
import math
import random
import statistics
from fractions import Fraction

import pytest

from pebr.report.stats import mcnemar_exact, mean_interval, normal_quantile, t_cdf, t_quantile, wilson_interval

# Two-sided normal quantiles, written out (not computed by the code under test).
Z = {0.90: 1.6448536269514722, 0.95: 1.959963984540054, 0.99: 2.5758293035489004}


def wilson_by_quadratic(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson interval as Wilson derived it: the p with |p_hat - p| = z sqrt(p (1 - p) / n),
    i.e. the roots of (1 + z^2/n) p^2 - (2 p_hat + z^2/n) p + p_hat^2 = 0."""
    ph = k / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (5, 10), (81, 263), (1, 1), (0, 1), (3, 7)])
@pytest.mark.parametrize("confidence", [0.90, 0.95, 0.99])
def test_wilson_matches_the_quadratic(k, n, confidence):
    lo, hi = wilson_interval(k, n, confidence=confidence)
    elo, ehi = wilson_by_quadratic(k, n, Z[confidence])
    assert lo == pytest.approx(elo, abs=1e-12) and hi == pytest.approx(ehi, abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_on_fresh_counts():
    rng = random.Random()
    for _ in range(200):
        n = rng.randint(1, 5000)
        k = rng.randint(0, n)
        lo, hi = wilson_interval(k, n)
        elo, ehi = wilson_by_quadratic(k, n, Z[0.95])
        assert (lo, hi) == pytest.approx((elo, ehi), abs=1e-12), (k, n)


# Newcombe (1998), "Two-sided confidence intervals for the single proportion: comparison of seven
# methods", Statistics in Medicine 17:857-872, Table II, method 3 (Wilson score, no continuity correction).
NEWCOMBE = [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)]


@pytest.mark.parametrize("k, n, lo, hi", NEWCOMBE)
def test_wilson_matches_published_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=6e-5)


def test_wilson_edges_are_exact_and_bad_counts_raise():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing measured: nothing known
    for k, n in ((-1, 5), (6, 5), (1, -1)):
        with pytest.raises(ValueError, match="correct"):
            wilson_interval(k, n)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=1.0)


def test_interval_narrows_with_n_and_widens_with_confidence():
    p = random.Random().choice([0.1, 0.3, 0.5, 0.8])
    widths = []
    for n in (10, 40, 160, 640, 2560, 10240):
        lo, hi = wilson_interval(round(p * n), n)
        widths.append(hi - lo)
    assert all(a > b for a, b in zip(widths, widths[1:])), widths
    # For large n it is the normal interval: width ~ 2 z sqrt(p (1 - p) / n), so 4x n halves it.
    assert widths[-1] * math.sqrt(10240) == pytest.approx(2 * Z[0.95] * math.sqrt(p * (1 - p)), rel=0.01)
    w = [wilson_interval(7, 20, confidence=c) for c in (0.90, 0.95, 0.99)]
    assert w[0][1] - w[0][0] < w[1][1] - w[1][0] < w[2][1] - w[2][0]


def test_normal_quantile():
    for c, z in Z.items():
        assert normal_quantile(1 - (1 - c) / 2) == pytest.approx(z, abs=1e-12)


# Student t quantiles from printed tables (t_{p, df}, 3 decimals).
T_TABLE = [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 10, 2.228), (0.975, 30, 2.042),
           (0.95, 3, 2.353), (0.995, 5, 4.032), (0.995, 1, 63.657), (0.90, 20, 1.325)]


@pytest.mark.parametrize("p, df, t", T_TABLE)
def test_t_quantile_matches_the_table(p, df, t):
    assert t_quantile(p, df) == pytest.approx(t, abs=6e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-t, abs=6e-4)


def test_t_cdf_matches_closed_forms_and_inverts():
    rng = random.Random()
    for _ in range(50):
        t = rng.uniform(-30, 30)
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
        p, df = rng.uniform(0.01, 0.99), rng.randint(1, 200)
        assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
    assert t_quantile(0.975, 100000) == pytest.approx(Z[0.95], abs=1e-4)  # t -> normal


def test_mean_interval():
    m = mean_interval([1.0, 2.0, 3.0])
    assert (m.mean, m.sd, m.n) == (2.0, 1.0, 3)
    assert (m.lo, m.hi) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)), abs=1e-6)
    rng = random.Random()
    xs = [rng.uniform(0.2, 0.6) for _ in range(5)]
    m = mean_interval(xs)
    half = 2.776445 * statistics.stdev(xs) / math.sqrt(5)
    assert (m.lo, m.hi) == pytest.approx((statistics.fmean(xs) - half, statistics.fmean(xs) + half), abs=1e-6)
    one = mean_interval([0.4])
    assert one.mean == 0.4 and math.isnan(one.lo) and math.isnan(one.hi)  # one seed says nothing of the spread
    assert mean_interval([]).n == 0


def _mcnemar_by_counting(gained: int, lost: int) -> float:
    """Exact, in rationals: twice the probability of a tail at least as far out, by enumerating
    the binomial coefficients (not the code under test's log-gamma sums)."""
    d, k = gained + lost, min(gained, lost)
    if d == 0:
        return 1.0
    tail = sum(Fraction(math.comb(d, x), 2 ** d) for x in range(k + 1))
    return float(min(Fraction(1), 2 * tail))


@pytest.mark.parametrize("gained, lost, p", [
    (6, 1, 0.125),            # 2 * (1 + 7) / 2^7
    (5, 0, 0.0625),           # 2 / 2^5
    (10, 0, 2 / 1024),
    (3, 3, 1.0), (0, 0, 1.0), (1, 0, 1.0),
    (65, 32, None), (32, 65, None), (500, 460, None), (2000, 0, None),
])
def test_mcnemar_exact(gained, lost, p):
    want = _mcnemar_by_counting(gained, lost) if p is None else p
    assert mcnemar_exact(gained, lost) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert mcnemar_exact(gained, lost) == pytest.approx(mcnemar_exact(lost, gained), rel=1e-12)


def test_mcnemar_on_fresh_counts_and_bad_input():
    rng = random.Random()
    for _ in range(50):
        g, l = rng.randint(0, 300), rng.randint(0, 300)
        assert mcnemar_exact(g, l) == pytest.approx(_mcnemar_by_counting(g, l), rel=1e-9, abs=1e-300)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)
