"""A run's metrics on one figure (what `python -m pebr.plot PATH [--out PNG]` draws).

PATH is a run folder (the training --output-dir, whose stage0/, stage1/, stage2/ folders each hold
a metrics.jsonl), one stage folder, or a metrics.jsonl file (one JSON line per step, see
`pebr.run.metrics_log`). Every stage goes on one figure, one line per stage: each stage counts its
steps from 1, so the x axis lays the stages end to end (stage 1's step 1 comes after stage 0's
last step; a dashed line marks where each stage starts). The panels: SFT loss (the `loss` of
stages that log no reward, i.e. stage 0), reward/overall, accuracy, kl, entropy, response_length.
A panel takes the metric of its name, or the metrics whose `/`-separated name contains it
(`reward/accuracy`, `stage2/reward/overall`, `response_length/mean`, `actor/kl`). A panel with no
data is not drawn; a figure with none says "no data". Records carrying a `stage` field get one
line per stage too. Malformed lines (a run killed mid-line) are skipped and counted.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only; no display on the training machines
import matplotlib.pyplot as plt  # noqa: E402

from pebr.run.metrics_log import read_metrics_counted  # noqa: E402


class Panel(NamedTuple):
    name: str  # the metric (matched by `_matching_keys`)
    title: str
    sft_only: bool = False  # only from SFT stages: the GRPO loss is another quantity on another scale


PANELS = (
    Panel("loss", "SFT loss", sft_only=True),
    Panel("reward/overall", "reward/overall"),
    Panel("accuracy", "accuracy"),
    Panel("kl", "kl"),
    Panel("entropy", "entropy"),
    Panel("response_length", "response_length"),
)
_MAX_LINES = 6
_STAGE_DIR = re.compile(r"stage(\d+)")

Stage = tuple[str | None, list[dict]]  # (name, records); name None for a file outside a stage folder


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


def _is_sft(records: list[dict]) -> bool:
    """A stage that logs no reward is a warm-up SFT stage (stage 0 logs loss, grad_norm, lr, ...)."""
    return not _matching_keys(records, "reward/overall")


def _step(r: dict):
    s = r.get("step")
    return s if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) else None


def _offsets(stages: list[Stage]) -> list[float]:
    """x shift per stage so the stages lie end to end: a stage whose steps start at or before the
    previous stage's last x starts right after it (stage k counts from 1 again); a stage already
    numbered after it (one file, one step counter, a `stage` field) keeps its steps."""
    offsets, end = [], None
    for _, records in stages:
        steps = [s for s in map(_step, records) if s is not None]
        off = end if end is not None and steps and min(steps) <= end else 0.0
        offsets.append(off)
        if steps:
            end = max(steps) + off if end is None else max(end, max(steps) + off)
    return offsets


def by_stage_field(records: list[dict], name: str | None = None) -> list[Stage]:
    """Split one file's records by their `stage` field, in order of first appearance
    (one group `name` when they have none)."""
    groups: dict = {}
    for r in records:
        groups.setdefault(str(r["stage"]) if "stage" in r else name, []).append(r)
    return list(groups.items()) or [(name, [])]


def draw(stages: list[Stage], *, title: str = ""):
    """The figure of `stages` -> (matplotlib Figure, {panel title: {line label: points}}).
    Only panels with data get axes; the caller saves and closes the figure."""
    offsets = _offsets(stages)
    named = sum(1 for name, _ in stages if name is not None)
    plan = []
    for panel in PANELS:
        lines = []
        for i, ((name, records), off) in enumerate(zip(stages, offsets)):
            if panel.sft_only and not _is_sft(records):
                continue
            for key in _matching_keys(records, panel.name):
                pts = [(_step(r) + off, float(r[key])) for r in records
                       if _step(r) is not None and isinstance(r.get(key), (int, float))
                       and not isinstance(r[key], bool) and math.isfinite(r[key])]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    lines.append((key if name is None or named < 2 else f"{key} ({name})", xs, ys, i))
        if lines:
            plan.append((panel.title, lines))
    n = max(1, len(plan))
    ncols = 1 if n == 1 else 2 if n <= 4 else 3
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.5 * nrows), squeeze=False, sharex=True)
    flat = list(axes.flat)
    starts = [off for off, (_, recs) in zip(offsets, stages) if off and recs][:10]
    drawn: dict[str, dict[str, int]] = {}
    for ax, (panel_title, lines) in zip(flat, plan):
        ax.set_title(panel_title)
        one_per_stage = len({i for *_, i in lines}) == len(lines)
        for label, xs, ys, i in lines:
            # a stage keeps its colour across panels when it has one line per panel
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label,
                    color=f"C{i % 10}" if one_per_stage else None)
            drawn.setdefault(panel_title, {})[label] = len(xs)
        for x in starts:
            ax.axvline(x + 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in flat[len(plan):]:
        ax.set_visible(False)
    if not plan:
        flat[0].set_visible(True)
        flat[0].set_axis_off()
        flat[0].text(0.5, 0.5, "no data", ha="center", va="center", transform=flat[0].transAxes)
    for ax in axes[-1]:
        ax.set_xlabel("step" if len(stages) < 2 else "step (stages end to end)")
        ax.xaxis.set_tick_params(labelbottom=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig, drawn


def save(fig, out: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_metrics(records: list[dict], out: str, *, title: str = "") -> str:
    """Draw the panels of one file's `records` (one line per `stage` field value) into PNG `out`."""
    fig, _ = draw(by_stage_field(records), title=title)
    return save(fig, out)


def load(path: str) -> tuple[list[Stage], dict[str, int]]:
    """(stages, {metrics file: malformed lines skipped}) at `path`: a metrics.jsonl file, a folder
    holding one (a stage folder), or a run folder whose stageK/ folders hold one (in stage order).
    A file in a folder named stageK is stage "stageK". ([], {}) when there is none."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "metrics.jsonl")):
        found = sorted((int(m.group(1)), os.path.join(path, d, "metrics.jsonl"))
                       for d in os.listdir(path) if (m := _STAGE_DIR.fullmatch(d)))
        files = [f for _, f in found if os.path.isfile(f)]
    else:
        files = [os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path]
        files = [f for f in files if os.path.isfile(f)]
    stages, skipped = [], {}
    for f in files:
        records, bad = read_metrics_counted(f)
        skipped[f] = bad
        folder = os.path.basename(os.path.dirname(os.path.abspath(f)))
        stages += by_stage_field(records, folder if _STAGE_DIR.fullmatch(folder) else None)
    return stages, skipped


@dataclass
class Plotted:
    """What `plot_path` drew: the image, the lines per panel, steps per stage, skipped lines."""

    out: str
    drawn: dict[str, dict[str, int]]
    steps: dict = field(default_factory=dict)  # stage name (None: unnamed) -> records
    skipped: dict[str, int] = field(default_factory=dict)  # metrics file -> malformed lines


def default_out(path: str) -> str:
    """PATH/metrics.png for a folder; the file's own name with .png for a file."""
    if os.path.isdir(path):
        return os.path.join(path, "metrics.png")
    return os.path.splitext(path)[0] + ".png"


def plot_path(path: str, out: str | None = None) -> Plotted | None:
    """Plot every stage found at `path` (see `load`) into `out` (default: `default_out`);
    None when there is no metrics file there."""
    stages, skipped = load(path)
    if not skipped:
        return None
    out = out or default_out(path)
    fig, drawn = draw(stages, title=os.path.basename(os.path.abspath(path)))
    save(fig, out)
    return Plotted(out, drawn, {name: len(recs) for name, recs in stages}, skipped)
