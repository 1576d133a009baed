"""What an ablation table without its per-item records still says about the paired comparison.

    python -m bench.curriculum_bounds docs/results/curriculum.md

A curriculum.md written before the paired comparison (pebr/report/paired.py) keeps each arm's
correct/n per seed, not which items. The pooled difference b - other is exact from those counts
(the arms were graded on the same items), and so is the per-seed differences' t interval; the
pooled exact test needs the discordant pairs D, which the counts only bound: per seed
|correct_b - correct_o| <= D_s <= min(correct_b + correct_o, 2 n - correct_b - correct_o). This prints
the pooled p at both ends of that range, and at a given discordance rate (--discordance).
"""
from __future__ import annotations

import argparse
import re
import sys

from pebr.report.stats import mcnemar_exact, mean_interval

ROW = re.compile(r"^\| ([abc]) \| (\d+) \| .*? (\d+)/(\d+) \| .*? (\d+)/(\d+) \|")
KINDS = ("perception", "reasoning")


def read_counts(path: str) -> dict:
    """curriculum.md's per-seed table -> {arm: {kind: [(correct, n) per seed]}}."""
    out: dict = {}
    with open(path) as f:
        for line in f:
            m = ROW.match(line)
            if m:
                arm, _, pc, pn, rc, rn = m.groups()
                out.setdefault(arm, {k: [] for k in KINDS})
                out[arm]["perception"].append((int(pc), int(pn)))
                out[arm]["reasoning"].append((int(rc), int(rn)))
    if not {"a", "b", "c"} <= set(out):
        raise ValueError(f"{path}: no per-seed rows of arms a, b and c")
    return out


def _p_at(total: int, net: int) -> float:
    """McNemar's exact p with `total` discordant pairs of which gained - lost = `net` (parity matched)."""
    total -= (total - net) % 2
    gained = (total + net) // 2
    return mcnemar_exact(gained, total - gained)


def bounds(counts: dict, other: str, kind: str, discordance: float) -> dict:
    b, o = counts["b"][kind], counts[other][kind]
    n = b[0][1]
    pairs = n * len(b)
    net = sum(cb - co for (cb, _), (co, _) in zip(b, o))
    d_min = sum(abs(cb - co) for (cb, _), (co, _) in zip(b, o))
    d_max = sum(min(cb + co, 2 * n - cb - co) for (cb, _), (co, _) in zip(b, o))
    d_at = min(max(round(discordance * pairs), d_min), d_max)
    seeds = mean_interval([(cb - co) / n for (cb, _), (co, _) in zip(b, o)])
    return {"pairs": pairs, "net": net, "diff": net / pairs, "d_min": d_min, "d_max": d_max,
            "p_min": _p_at(d_min, net), "p_max": _p_at(d_max, net), "d_at": d_at, "p_at": _p_at(d_at, net),
            "seeds": seeds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", help="a curriculum.md with the per-seed table")
    ap.add_argument("--discordance", type=float, default=0.53, help="a discordance rate to show p at (default: the pilot bound)")
    args = ap.parse_args(argv)
    counts = read_counts(args.table)
    print("| comparison | kind | pooled difference | pairs | D: from counts | pooled p over that range | "
          f"p at discordance {args.discordance} | per-seed mean [95% t] |")
    print("|---|---|---|---|---|---|---|---|")
    for other in ("a", "c"):
        for kind in KINDS:
            r = bounds(counts, other, kind, args.discordance)
            s = r["seeds"]
            print(f"| b - {other} | {kind} | {r['diff']:+.3f} ({r['net']:+d}) | {r['pairs']} | {r['d_min']}-{r['d_max']} | "
                  f"{r['p_min']:.2g} to {r['p_max']:.3g} | {r['p_at']:.3g} (D = {r['d_at']}) | "
                  f"{s.mean:+.3f} [{s.lo:+.3f}, {s.hi:+.3f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
