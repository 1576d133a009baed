"""The curriculum ablation's report: accuracy per kind, means over seeds with their t intervals,
arm b against a and c on the same items (per seed and pooled, per kind and per task type), the
Markdown table and the chart (pebr.recipe.curriculum writes them), all read from the result dict
it saves as curriculum.json: arms in their order (a, b, c), each with its label."""
from __future__ import annotations

import math

from pebr.report.eval_tables import md, proportion
from pebr.report.paired import DEFAULT_BOOTSTRAP, compare
from pebr.report.stats import mean_interval

KINDS = ("perception", "reasoning")
COMPARISONS = (("b", "a"), ("b", "c"))  # arm b (perception, then reasoning) against each: b - other


def kind_scores(summary: dict) -> dict:
    """An eval summary -> {"perception": {accuracy, n, correct, lo, hi}, "reasoning": {...}} (a kind
    with no items: accuracy 0 of n = 0, interval [0, 1])."""
    by_kind = summary.get("by_kind") or {}
    return {k: by_kind.get(k) or proportion(0, 0) for k in KINDS}


def aggregate(per_seed: list[dict], *, confidence: float = 0.95) -> dict:
    """[{kind: {"accuracy", ...}} per seed] -> {kind: {"mean", "lo", "hi", "n", "sd", "values"}}:
    the mean over seeds of each kind's accuracy with its Student t interval (lo, hi nan below 2 seeds)."""
    out = {}
    for k in KINDS:
        values = [float(s[k]["accuracy"]) for s in per_seed]
        out[k] = {**mean_interval(values, confidence=confidence).to_dict(), "values": values}
    return out


def paired_results(outcomes: dict[str, list[dict[str, dict]]], *, confidence: float = 0.95,
                   resamples: int = DEFAULT_BOOTSTRAP) -> dict:
    """Arm b against a and against c on the same held-out items.

    outcomes: arm key -> one {item id: record} per seed, seeds in the same order for every arm
    (record: "correct", "kind", "task_type", as heldout.jsonl holds them). ->

        {"b-a": {"kinds": {kind: compare(...)}, "types": {task type: {**compare(...), "kind"}}}, "b-c": ...}

    compare (pebr.report.paired): the difference b - other with its bootstrap interval and exact
    p, per seed and pooled over the seeds; the items of a kind or type are arm b's."""
    out = {}
    for second, first in COMPARISONS:
        if second not in outcomes or first not in outcomes:
            continue
        b = [{i: r["correct"] for i, r in seed.items()} for seed in outcomes[second]]
        o = [{i: r["correct"] for i, r in seed.items()} for seed in outcomes[first]]
        meta = {i: r for seed in outcomes[second] for i, r in seed.items()}
        kind_of = {i: str(r.get("kind") or str(r.get("task_type", "")).split("/")[0]) for i, r in meta.items()}
        groups = {"kinds": {k: [i for i in meta if kind_of[i] == k] for k in KINDS},
                  "types": {}}
        for i, r in meta.items():
            groups["types"].setdefault(str(r.get("task_type")), []).append(i)
        res = {"kinds": {}, "types": {}}
        for level, by in groups.items():
            for name, ids in sorted(by.items()) if level == "types" else by.items():
                row = compare(o, b, ids=ids, confidence=confidence, resamples=resamples)
                res[level][name] = row if level == "kinds" else {**row, "kind": kind_of[ids[0]]}
        out[f"{second}-{first}"] = res
    return out


def _num(x, fmt=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _mean_cell(a: dict) -> str:
    if a["n"] < 2 or a["lo"] is None or not math.isfinite(a["lo"]):
        return f"{_num(a['mean'])} [-]"
    return f"{_num(a['mean'])} [{_num(a['lo'])}, {_num(a['hi'])}]"


def _wilson_cell(p: dict) -> str:
    return f"{_num(p['accuracy'])} [{_num(p['lo'])}, {_num(p['hi'])}] {p['correct']}/{p['n']}"


def _secs(s) -> str:
    return "-" if s is None else f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def _signed(x, fmt="+.3f") -> str:
    return _num(x, fmt)


def _p(p) -> str:
    return "-" if p is None else f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _diff_cell(r: dict) -> str:
    return f"{_signed(r['diff'])} [{_signed(r['lo'])}, {_signed(r['hi'])}]"


def _paired_verdict(result: dict, alpha: float = 0.05) -> list[str]:
    """One line per comparison and kind: the pooled difference, its interval and p, and what it says."""
    lines = []
    for comp, res in result["paired"].items():
        for kind in KINDS:
            r = res["kinds"].get(kind)
            if not r or not r["n"]:
                continue
            seeds = r["seeds"]
            head = (f"- {kind} accuracy, {comp.replace('-', ' - ')}: {_diff_cell(r)}, p = {_p(r['p'])} "
                    f"({r['n']} pairs over {seeds} seed{'s' * (seeds != 1)}: {r['gained']} gained, {r['lost']} lost): ")
            if r["p"] is not None and r["p"] < alpha:
                what = f"{comp[0]} is {'better' if r['diff'] > 0 else 'worse'} at the {alpha} level"
            else:
                what = f"no difference at the {alpha} level; the interval bounds it"
            lines.append(head + what)
    return ["Pooled over seeds, b - other on the same items [95% bootstrap interval], exact paired p "
            "(the tables below say how):", "", *lines]


def _verdict(result: dict) -> list[str]:
    """The paired comparisons when the result has them; else (a result written before they were)
    plain differences of means, arm b against a and c, and whether their t intervals overlap."""
    if result.get("paired"):
        return _paired_verdict(result)
    lines = []
    arms = result["arms"]
    for kind in KINDS:
        b = arms["b"][kind]
        for other in ("a", "c"):
            o = arms[other][kind]
            diff = b["mean"] - o["mean"]
            if b["n"] < 2 or b["lo"] is None or o["lo"] is None:
                sep = "one seed: no interval"
            elif b["lo"] > o["hi"] or o["lo"] > b["hi"]:
                sep = "the t intervals do not overlap"
            else:
                sep = "the t intervals overlap: these seeds do not separate them"
            lines.append(f"- {kind} accuracy, b - {other}: {diff:+.3f} ({sep})")
    return lines


def markdown(result: dict) -> str:
    s, ho = result["settings"], result["held_out"]
    n_seeds = s["seeds"]
    lines = [
        "# Curriculum ablation: perception GRPO before reasoning GRPO", "",
        f"Command: `{result['command']}`  ",
        f"Wall time of this command: {_secs(result['wall_s'])}; started {result['started']}.", "",
        f"From one warm-up (`{result['warmup']['path']}`) and one dataset-level sampling "
        f"({result['sampling']['counts']}), {s['steps']} GRPO steps per arm, preset `{s['preset']}`, "
        f"seeds {', '.join(map(str, range(n_seeds)))}. Union reward: {result['union_reward']}.",
        f"Held-out: {ho['n']} built-in items of seed {ho['seed']} ({ho['dropped_equal_to_training_items']} dropped as "
        f"equal to a training item), greedy, max_new_tokens {s['max_new_tokens']}.", "",
        "| arm | what | perception acc, mean [95% t interval] | reasoning acc, mean [95% t interval] | seeds |",
        "|---|---|---|---|---|",
    ]
    for key, a in result["arms"].items():
        what = " then ".join(f"{st['name']} ({st['steps']} step{'s' * (st['steps'] != 1)}, {st['reward']} reward, "
                            f"{st['split']})" for st in a["stages"])
        lines.append(f"| {key} | {a['label']}: {what} | {_mean_cell(a['perception'])} | "
                     f"{_mean_cell(a['reasoning'])} | {a['perception']['n']} |")
    w = result["warmup_eval"]
    lines.append(f"| warm-up | the start of every arm (one eval) | {_wilson_cell(w['perception'])} | "
                 f"{_wilson_cell(w['reasoning'])} | - |")
    lines += ["", "Mean over seeds with Student's t interval (n - 1 degrees of freedom; `[-]` with one seed). "
              "The warm-up row and the table below: accuracy [95% Wilson interval] correct/n of one eval.", "",
              "## Result", "", *_verdict(result), "",
              "## Per seed", "",
              "| arm | seed | perception acc [95% Wilson] | reasoning acc [95% Wilson] | GRPO steps | training wall time | trained |",
              "|---|---|---|---|---|---|---|"]
    for key, a in result["arms"].items():
        for r in a["per_seed"]:
            steps = " + ".join(str(st["steps"]) for st in r["stages"])
            walls = " + ".join(_secs(st["wall_s"]) for st in r["stages"])
            now = "now" if any(st["trained_now"] for st in r["stages"]) else "earlier run (skipped)"
            lines.append(f"| {key} | {r['seed']} | {_wilson_cell(r['eval']['perception'])} | "
                         f"{_wilson_cell(r['eval']['reasoning'])} | {steps} | {walls} | {now} |")
    lines += ["", f"Warm-up: {_secs(result['warmup']['wall_s'])} this run "
              f"({'reused' if result['warmup']['reused'] else 'trained'}); sampling {_secs(result['sampling']['wall_s'])}; "
              f"evals {_secs(result['eval_wall_s'])} this run.", ""]
    if result.get("paired"):
        lines += _paired_tables(result["paired"])
    if result.get("plan"):
        lines += ["## Power, as planned before the run", "", "```", *result["plan"]["lines"], "```", ""]
    return "\n".join(lines)


def _paired_tables(paired: dict) -> list[str]:
    lines = ["## Paired: arm b against a and c on the same held-out items", "",
             "Difference in accuracy, b - other. Per seed: McNemar's exact test on that seed's discordant pairs. "
             "Pooled: the exact paired test over every seed's pairs (swapping the two arms' labels pair by pair; "
             "its exact distribution is McNemar's on the summed counts, which is also the Mantel-Haenszel test "
             "for pairs stratified by seed). Intervals: 95% percentile bootstrap over items, each item with its "
             "pairs in every seed. Over seeds: the per-seed differences' mean with a Student t interval, "
             "which carries the seed-to-seed spread the pooled test leaves out.", "",
             "| comparison | kind | seed | difference [95% interval] | gained | lost | pairs | p |",
             "|---|---|---|---|---|---|---|---|"]
    for comp, res in paired.items():
        for kind, r in res["kinds"].items():
            for s, ps in enumerate(r["per_seed"]):
                lines.append(f"| {comp} | {kind} | {s} | {_diff_cell(ps)} | {ps['gained']} | {ps['lost']} | {ps['n']} | "
                             f"{_p(ps['p'])} |")
            lines.append(f"| **{comp}** | **{kind}** | **pooled** | **{_diff_cell(r)}** | {r['gained']} | {r['lost']} | "
                         f"{r['n']} | **{_p(r['p'])}** |")
            o = r["over_seeds"]
            lines.append(f"| {comp} | {kind} | over seeds (t) | {_signed(o['mean'])} [{_signed(o['lo'])}, "
                         f"{_signed(o['hi'])}] | | | | |")
    lines += ["", "### Per task type, pooled over seeds", "",
              "| task type | kind | " + " | ".join(f"{c} [95% interval] | p" for c in paired) + " |",
              "|---|---|" + "---|---|" * len(paired)]
    types = sorted({t for res in paired.values() for t in res["types"]})
    for t in types:
        rows = [res["types"].get(t) for res in paired.values()]
        kind = next(r["kind"] for r in rows if r)
        cells = " | ".join("- | -" if r is None else f"{_diff_cell(r)} ({r['gained']}/{r['lost']} of {r['n']}) | {_p(r['p'])}"
                           for r in rows)
        lines.append(f"| {md(t)} | {kind} | {cells} |")
    lines += ["", "Per task type: (gained/lost of pairs); no correction for the number of types compared.", ""]
    return lines


def plot(result: dict, path: str) -> None:
    """Bar chart: perception and reasoning accuracy per arm (mean over seeds, t-interval error bars,
    each seed a dot) and the warm-up's (Wilson interval)."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    rows = [(f"{key}: {a['label']}", a) for key, a in result["arms"].items()]
    paired = result.get("paired") or {}
    if paired:
        fig, (ax, axd) = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1.35, 1]})
    else:
        fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / (len(rows) + 1)
    w = result["warmup_eval"]
    for j, kind in enumerate(KINDS):
        p = w[kind]
        ax.bar(j, p["accuracy"], width, color="0.7", label="warm-up" if j == 0 else None,
               yerr=[[p["accuracy"] - p["lo"]], [p["hi"] - p["accuracy"]]], capsize=3)
        for i, (label, a) in enumerate(rows, start=1):
            g = a[kind]
            x = j + i * width
            err = None
            if g["n"] >= 2 and g["lo"] is not None and math.isfinite(g["lo"]):
                err = [[g["mean"] - g["lo"]], [g["hi"] - g["mean"]]]
            ax.bar(x, g["mean"], width, color=f"C{i - 1}", yerr=err, capsize=3, label=label if j == 0 else None)
            ax.plot([x] * len(g["values"]), g["values"], "k.", markersize=4)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(KINDS))], [f"{k} accuracy" for k in KINDS])
    ax.set_ylabel("held-out accuracy")
    ax.set_xlabel("bars: mean over seeds, error bars 95% t interval (warm-up: Wilson); dots: one seed each", fontsize=8)
    ax.set_ylim(0, max(0.05, min(1.0, ax.get_ylim()[1])))
    s = result["settings"]
    ax.set_title(f"curriculum ablation: {s['steps']} GRPO steps per arm, {s['seeds']} seed(s), "
                 f"{result['held_out']['n']} held-out items", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if paired:
        _plot_differences(axd, paired)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_differences(ax, paired: dict) -> None:
    """b - a and b - c per kind: each seed (grey) and pooled (black), with their bootstrap intervals;
    a zero line."""
    ticks, labels, y = [], [], 0.0
    for comp, res in paired.items():
        for kind, r in res["kinds"].items():
            for s, ps in enumerate(r["per_seed"]):
                _interval_row(ax, y, ps, "0.6")
                ticks.append(y)
                labels.append(f"seed {s}")
                y += 1
            _interval_row(ax, y, r, "k")
            ticks.append(y)
            labels.append(f"{comp} {kind}, pooled")
            y += 1.5
    ax.axvline(0.0, color="C3", linewidth=0.8)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("difference in held-out accuracy, 95% bootstrap interval over items", fontsize=8)
    ax.set_title("arm b against a and c, same items", fontsize=10)


def _interval_row(ax, y: float, r: dict, color: str) -> None:
    d, lo, hi = r["diff"], r["lo"], r["hi"]
    if d is None or not math.isfinite(d):
        return
    if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
        ax.plot([lo, hi], [y, y], color=color, linewidth=1.5)
    ax.plot([d], [y], "o", color=color, markersize=4)
