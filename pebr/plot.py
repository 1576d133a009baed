"""`python -m pebr.plot PATH [--out PNG]`: a run's metrics per step, every stage on one figure.

PATH is a run folder (the training --output-dir, whose stage0/, stage1/, stage2/ folders each hold
a metrics.jsonl), one stage folder, or a metrics.jsonl file. What is drawn and how:
pebr/report/metrics_plot.py.
"""
from __future__ import annotations

import argparse
import sys

from pebr.report.metrics_plot import (  # noqa: F401
    PANELS,
    Plotted,
    by_stage_field,
    default_out,
    draw,
    load,
    plot_metrics,
    plot_path,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pebr.plot",
        description="Plot a run's metrics per step: SFT loss, reward/overall, accuracy, kl, entropy and "
                    "response_length, every stage on one figure, laid end to end.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="run folder (the training --output-dir, with stage0/ stage1/ stage2/), "
                             "a stage folder, or a metrics.jsonl file")
    parser.add_argument("--out", metavar="PNG", default=None,
                        help="output image (default: RUN_DIR/metrics.png; for a file, its name with .png)")
    args = parser.parse_args(argv)
    res = plot_path(args.run_dir, args.out)
    if res is None:
        print(f"error: no metrics.jsonl at {args.run_dir} (nor in its stageK/ folders)", file=sys.stderr)
        return 2
    steps = ", ".join(f"{name or 'metrics'} {n} steps" for name, n in res.steps.items())
    print(f"wrote {res.out} ({steps}; panels: {', '.join(res.drawn) or 'no data'})")
    for f, bad in res.skipped.items():
        if bad:
            print(f"skipped {bad} malformed line(s) in {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
