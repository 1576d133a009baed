"""bench/curriculum_bounds.py: a per-seed table without item records, read back and bounded by hand."""
import pytest

from bench.curriculum_bounds import bounds, main, read_counts

TABLE = """| arm | seed | perception acc [95% Wilson] | reasoning acc [95% Wilson] | GRPO steps | training wall time | trained |
|---|---|---|---|---|---|---|
| a | 0 | 0.300 [0.1, 0.5] 3/10 | 0.200 [0.1, 0.5] 2/10 | 60 | 1 s | now |
| a | 1 | 0.500 [0.1, 0.5] 5/10 | 0.400 [0.1, 0.5] 4/10 | 60 | 1 s | now |
| b | 0 | 0.600 [0.1, 0.5] 6/10 | 0.900 [0.1, 0.5] 9/10 | 30 + 30 | 1 s + 1 s | now |
| b | 1 | 0.400 [0.1, 0.5] 4/10 | 0.800 [0.1, 0.5] 8/10 | 30 + 30 | 1 s + 1 s | now |
| c | 0 | 0.600 [0.1, 0.5] 6/10 | 0.900 [0.1, 0.5] 9/10 | 60 | 1 s | now |
| c | 1 | 0.400 [0.1, 0.5] 4/10 | 0.800 [0.1, 0.5] 8/10 | 60 | 1 s | now |
"""


def test_bounds_of_a_hand_made_table(tmp_path, capsys):
    path = tmp_path / "curriculum.md"
    path.write_text(TABLE)
    counts = read_counts(str(path))
    assert counts["a"]["reasoning"] == [(2, 10), (4, 10)] and counts["b"]["perception"] == [(6, 10), (4, 10)]
    # reasoning b - a: 9 - 2 and 8 - 4 -> net +11 of 20 pairs; D at least 7 + 4 = 11 (every discordant pair
    # gained), at most min(11, 9) + min(12, 8) = 17; p at D = 11: 2 / 2^11; at D = 17 (14 gained, 3 lost):
    # 2 (C(17,0) + C(17,1) + C(17,2) + C(17,3)) / 2^17 = 2 * 834 / 131072
    r = bounds(counts, "a", "reasoning", 0.5)
    assert (r["pairs"], r["net"], r["d_min"], r["d_max"]) == (20, 11, 11, 17)
    assert r["p_min"] == pytest.approx(2 / 2**11) and r["p_max"] == pytest.approx(2 * 834 / 2**17)
    assert r["d_at"] == 11  # 0.5 x 20 = 10 is below what the counts allow
    # perception b - a: +3 then -1: net +2, D from 4 to min(9, 11) + min(9, 11) = 18
    p = bounds(counts, "a", "perception", 0.5)
    assert (p["net"], p["d_min"], p["d_max"], p["d_at"]) == (2, 4, 18, 10)
    assert p["seeds"].mean == pytest.approx((0.3 - 0.1) / 2)
    same = bounds(counts, "c", "reasoning", 0.5)  # c is b: no difference, any D
    assert same["net"] == 0 and same["p_min"] == same["p_max"] == 1.0
    assert main([str(path)]) == 0 and "| b - a | reasoning | +0.550 (+11) | 20 | 11-17 |" in capsys.readouterr().out
