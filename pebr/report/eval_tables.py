"""Eval results as numbers and tables: accuracy with Wilson intervals per task type and kind, one
column per checkpoint, and paired comparisons (McNemar) of checkpoints graded on the same items."""
from __future__ import annotations

import json
import os
from collections import defaultdict

from pebr.report.paired import discordant
from pebr.report.stats import mcnemar_exact, wilson_interval


def proportion(correct: int, n: int, *, confidence: float = 0.95) -> dict:
    """k of n correct -> {"accuracy", "n", "correct", "lo", "hi"} (lo, hi: Wilson interval; n = 0: accuracy 0, [0, 1])."""
    lo, hi = wilson_interval(correct, n, confidence=confidence)
    return {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct, "lo": lo, "hi": hi}


def _kind_of(record: dict) -> str:
    # Records written before `kind` was stored: built-in task types read "perception/colour".
    return record.get("kind") or str(record.get("task_type", "")).split("/")[0] or "unknown"


def summarize(records: list[dict], *, confidence: float = 0.95) -> dict:
    """Records with "task_type", "correct", "format" (and "kind") -> summary:

        {"accuracy", "format", "n", "correct", "lo", "hi", "confidence",
         "by_kind": {kind: {"accuracy", "n", "correct", "lo", "hi"}},
         "by_type": {type: {"accuracy", "n", "correct", "lo", "hi", "kind"}}}

    accuracy = correct / n; [lo, hi] its Wilson interval at `confidence`. The by_type (and by_kind)
    counts add up to the overall n and correct."""
    by_type, by_kind, kind_of_type = defaultdict(list), defaultdict(list), {}
    for r in records:
        by_type[r["task_type"]].append(bool(r["correct"]))
        by_kind[_kind_of(r)].append(bool(r["correct"]))
        kind_of_type.setdefault(r["task_type"], _kind_of(r))
    n = len(records)
    overall = proportion(sum(bool(r["correct"]) for r in records), n, confidence=confidence)
    return {
        "accuracy": overall["accuracy"],
        "format": sum(r["format"] for r in records) / max(n, 1),
        "n": n,
        "correct": overall["correct"], "lo": overall["lo"], "hi": overall["hi"], "confidence": confidence,
        "by_kind": {k: proportion(sum(v), len(v), confidence=confidence) for k, v in sorted(by_kind.items())},
        "by_type": {t: {**proportion(sum(v), len(v), confidence=confidence), "kind": kind_of_type[t]}
                    for t, v in sorted(by_type.items())},
    }


# ---- tables: one column per checkpoint

def complete_summary(summary: dict) -> dict:
    """A summary from any version of pebr.eval -> one with "correct", "lo", "hi" in every group and
    "by_kind". Older ones (the JSON line eval printed) held only "accuracy" and "n" per group:
    correct = round(accuracy * n), kinds from the task types' "perception/..." prefix."""
    if not isinstance(summary, dict) or not isinstance(summary.get("by_type"), dict) or "n" not in summary:
        raise ValueError("not an eval summary (no \"n\" and \"by_type\")")
    conf = float(summary.get("confidence", 0.95))

    def fill(g: dict) -> dict:
        n = int(g["n"])
        k = int(g["correct"]) if "correct" in g else round(float(g["accuracy"]) * n)
        return {**g, **proportion(k, n, confidence=conf)}

    out = {**summary, **fill(summary), "confidence": conf}
    out["by_type"] = {t: fill(g) for t, g in summary["by_type"].items()}
    if not isinstance(summary.get("by_kind"), dict):
        counts = defaultdict(lambda: [0, 0])
        for t, g in out["by_type"].items():
            kind = g.get("kind") or t.split("/")[0]
            counts[kind][0] += g["correct"]
            counts[kind][1] += g["n"]
        out["by_kind"] = {k: proportion(c, n, confidence=conf) for k, (c, n) in sorted(counts.items())}
    else:
        out["by_kind"] = {k: fill(g) for k, g in summary["by_kind"].items()}
    return out


def load_summaries(path: str) -> list[dict]:
    """A file pebr.eval wrote -> its summaries, completed: a <stem>.summary.json (one), a comparison
    JSON (its "models") or the JSON line eval prints (one). ValueError saying what is wrong."""
    with open(path) as f:
        text = f.read().strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:  # a saved stdout of eval: its last line is the summary
            data = json.loads(text.splitlines()[-1]) if text else None
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc})") from None
    found = data.get("models") if isinstance(data, dict) and isinstance(data.get("models"), list) else [data]
    stem = os.path.basename(path).split(".")[0]
    return [{"label": stem, **complete_summary(s)} for s in found]


def md(text) -> str:
    """text with the | of Markdown tables escaped."""
    return str(text).replace("|", "\\|")


def comparison_table(columns: list[tuple[str, dict]]) -> str:
    """[(label, summary)] -> a Markdown table: one row per task type, then per kind, then overall;
    one column per label; each cell "accuracy [lo, hi] correct/n" ("-" where a column has no such
    row). The interval is the summary's (Wilson, 95% unless it says otherwise)."""
    columns = [(label, complete_summary(s)) for label, s in columns]
    labels, seen = [], defaultdict(int)
    for label, _ in columns:  # two columns with one label (the same model twice) stay apart
        seen[label] += 1
        labels.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    types = sorted({t for _, s in columns for t in s["by_type"]})
    kinds = sorted({k for _, s in columns for k in s["by_kind"]})

    def cell(g):
        return "-" if g is None else f"{g['accuracy']:.3f} [{g['lo']:.3f}, {g['hi']:.3f}] {g['correct']}/{g['n']}"

    def row(cells):
        return "| " + " | ".join(md(c) for c in cells) + " |"

    lines = [row(["task type", *labels]), "|" + "---|" * (len(labels) + 1)]
    lines += [row([t, *(cell(s["by_type"].get(t)) for _, s in columns)]) for t in types]
    lines += [row([f"{k} (all)", *(cell(s["by_kind"].get(k)) for _, s in columns)]) for k in kinds]
    lines.append(row(["**overall**", *(cell(s) for _, s in columns)]))
    confs = sorted({s["confidence"] for _, s in columns})
    lines += ["", f"accuracy [{', '.join(f'{c:.0%}' for c in confs)} Wilson score interval] correct/n"]
    digests = {(s.get("items") or {}).get("ids_digest") for _, s in columns} - {None}  # None: an older eval
    if len(digests) > 1:
        lines.append("Note: the columns were not all evaluated on the same items (see each summary's \"items\").")
    return "\n".join(lines) + "\n"


def paired_comparison(columns: list[tuple[str, list[dict]]]) -> list[dict]:
    """[(label, records)] of models graded on the same items -> one row per consecutive pair and
    group (each kind, then "overall" when there are several kinds; with one it would repeat that row):

        {"before", "after", "group", "n", "gained", "lost", "delta", "p"}

    n: items present in both (matched by "id"); gained: wrong before, right after; lost: the
    reverse; delta = (gained - lost) / n, the change in accuracy; p: McNemar's exact p-value."""
    rows = []
    for (before, rec_a), (after, rec_b) in zip(columns, columns[1:]):
        a = {r["id"]: bool(r["correct"]) for r in rec_a}
        b = {r["id"]: bool(r["correct"]) for r in rec_b}
        kind = {r["id"]: _kind_of(r) for r in rec_a}
        groups = sorted({kind[i] for i in a if i in b})
        for group in [*groups, "overall"] if len(groups) > 1 else groups:
            n, gained, lost = discordant(a, b, [i for i in a if group == "overall" or kind[i] == group])
            rows.append({"before": before, "after": after, "group": group, "n": n, "gained": gained,
                         "lost": lost, "delta": (gained - lost) / n if n else 0.0,
                         "p": mcnemar_exact(gained, lost)})
    return rows


def paired_table(rows: list[dict]) -> str:
    """paired_comparison's rows -> a Markdown table ("" without rows)."""
    if not rows:
        return ""
    lines = ["| before -> after | group | change | gained | lost | McNemar p |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {md(r['before'])} -> {md(r['after'])} | {md(r['group'])} | {r['delta']:+.3f} | "
                     f"{r['gained']}/{r['n']} | {r['lost']}/{r['n']} | {r['p']:.3g} |")
    return ("\n".join(lines) + "\n\nPaired on the same items: gained = wrong before and right after, lost = the "
            "reverse; p: McNemar's exact two-sided test of gained against lost.\n")
