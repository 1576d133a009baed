"""The curriculum ablation's report: accuracy per kind, means over seeds with their t intervals,
the Markdown table and the bar chart (pebr.recipe.curriculum writes them), all read from the
result dict it saves as curriculum.json: arms in their order (a, b, c), each with its label."""
from __future__ import annotations

import math

from pebr.report.eval_tables import proportion
from pebr.report.stats import mean_interval

KINDS = ("perception", "reasoning")


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


def _verdict(result: dict) -> list[str]:
    """Plain differences of means, arm b against a and c, and whether their t intervals overlap."""
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
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Bar chart: perception and reasoning accuracy per arm (mean over seeds, t-interval error bars,
    each seed a dot) and the warm-up's (Wilson interval)."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    rows = [(f"{key}: {a['label']}", a) for key, a in result["arms"].items()]
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
