"""Plot a run's metrics: `python -m pebr.plot RUN_DIR [--out PNG]`.

Reads RUN_DIR/metrics.jsonl (one JSON line per step, see `pebr.metrics_log`) and draws four
panels against `step`: reward/overall, accuracy, kl, response_length. Each panel takes the
metric of that name, or the metrics whose `/`-separated name contains it (`reward/accuracy`,
`stage2/reward/overall`, `response_length/mean`, `actor/kl`); a panel with none says so. Runs with a
`stage` field get one line per stage.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only; no display on the training machines
import matplotlib.pyplot as plt  # noqa: E402

from pebr.metrics_log import read_metrics  # noqa: E402

PANELS = ("reward/overall", "accuracy", "kl", "response_length")
_MAX_LINES = 6


def _matching_keys(records: list[dict], name: str) -> list[str]:
    """Numeric metric keys for panel `name`: the key itself, else keys holding its `/`-separated
    parts as consecutive parts (`stage2/reward/overall`, `response_length/mean`, `actor/kl`;
    not `ppo_kl`, which is the drift from the rollout policy, not the KL to the reference)."""
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                keys[k] = None
    if name in keys:
        return [name]
    want = name.split("/")

    def holds(key: str) -> bool:
        parts = key.split("/")
        return any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1))

    return [k for k in keys if holds(k)][:_MAX_LINES]


def plot_metrics(records: list[dict], out: str, *, title: str = "") -> str:
    """Draw the four panels from `records` into PNG file `out`; returns `out`."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    stages = sorted({str(r["stage"]) for r in records if "stage" in r}) or [None]
    for ax, name in zip(axes.flat, PANELS):
        ax.set_title(name)
        ax.set_xlabel("step")
        keys = _matching_keys(records, name)
        drawn = 0
        for key in keys:
            for stage in stages:
                pts = [
                    (r["step"], r[key])
                    for r in records
                    if isinstance(r.get("step"), (int, float)) and isinstance(r.get(key), (int, float))
                    and math.isfinite(r[key]) and (stage is None or str(r.get("stage")) == stage)
                ]
                if not pts:
                    continue
                xs, ys = zip(*sorted(pts))
                label = key if stage is None else f"{key} ({stage})"
                ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
                drawn += 1
        if drawn:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, f"no {name} in metrics", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pebr.plot",
        description="Plot reward/overall, accuracy, kl and response_length per step from RUN_DIR/metrics.jsonl.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding metrics.jsonl")
    parser.add_argument("--out", metavar="PNG", default=None, help="output image (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    path = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        print(f"error: no metrics file at {path}", file=sys.stderr)
        return 2
    records = read_metrics(path)
    out = args.out or os.path.join(args.run_dir, "metrics.png")
    plot_metrics(records, out, title=os.path.basename(os.path.abspath(args.run_dir)))
    print(f"wrote {out} ({len(records)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
