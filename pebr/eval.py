"""`python -m pebr.eval --model DIR [--model DIR2 ...] [--data PATH]`: accuracy with the training
grader, with its 95% interval, overall, by kind (perception / reasoning) and by task type.

DIR: an HF folder, a stage folder (runs/stage2: its latest checkpoint), a checkpoints folder or
its `latest` file. Without --data: held-out procedural items (seed 999, distinct from every
training pool). Greedy decoding by default. Per model, responses are saved as JSONL (--output;
default OUT/eval/<model path>_<kind>.jsonl, OUT the run folder --output-dir) and beside them the
summary as JSON (<stem>.summary.json) and a Markdown table (<stem>.md). Several --model flags
evaluate each checkpoint on the same items and write one comparison table (rows: task types,
kinds, overall; one column per checkpoint) to OUT/eval/compare_<kind>.md (JSON beside it, or
--table). --compare A.summary.json B.summary.json ... tabulates earlier runs without re-running.
Intervals are Wilson score intervals (pebr.report.stats.wilson_interval). Checkpoints evaluated in one
run are also compared pairwise, each against the one before it on the same items: items gained and
lost, per kind and overall, with McNemar's exact p-value (pebr.report.stats.mcnemar_exact), a test that
uses the pairing two overlapping intervals ignore.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import defaultdict

import torch

from pebr.run.cli import add_fields
from pebr.recipe.config import EvalConfig
from pebr.report.stats import mcnemar_exact, wilson_interval


def evaluate(policy, items: list, *, max_new_tokens: int = 96, temperature: float = 0.0, batch_prompts: int = 32,
             world=None, confidence: float = 0.95) -> tuple[dict, list[dict]]:
    """-> (summary, one record per item); the summary as `summarize(records)` gives it.

    temperature: 0 (the default) decodes greedily, so the result does not depend on the RNG.
    world: a pebr.run.distributed.World: each rank answers items[rank::world_size]; every rank gets the
    merged records in item order."""
    from pebr.rewards import accuracy_reward, format_reward
    from pebr.rollout.hf_engine import generate_rollouts

    records = []
    W = world.world_size if world is not None else 1
    mine = items[world.rank :: W] if W > 1 else items
    for c0 in range(0, len(mine), batch_prompts):
        batch = mine[c0 : c0 + batch_prompts]
        ro = generate_rollouts(policy, batch, n=1, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens)
        for item, text, k in zip(batch, ro.texts, ro.num_tokens):
            records.append({
                "id": item.id, "task_type": item.task_type, "kind": item.kind, "problem": item.problem,
                "answer": item.answer,
                "response": text, "num_tokens": k, "correct": accuracy_reward(text, item.answer) >= 1.0,
                "format": format_reward(text),
            })
    if W > 1:
        position = {it.id: i for i, it in enumerate(items)}
        records = sorted((r for part in world.gather_objects(records) for r in part), key=lambda r: position[r["id"]])
    summary = summarize(records, confidence=confidence)
    return summary, records


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


def _md(text) -> str:
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
        return "| " + " | ".join(_md(c) for c in cells) + " |"

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
        a = {r["id"]: (bool(r["correct"]), _kind_of(r)) for r in rec_a}
        b = {r["id"]: bool(r["correct"]) for r in rec_b}
        shared = [i for i in a if i in b]
        groups = sorted({a[i][1] for i in shared})
        for group in [*groups, "overall"] if len(groups) > 1 else groups:
            ids = [i for i in shared if group == "overall" or a[i][1] == group]
            gained = sum(1 for i in ids if b[i] and not a[i][0])
            lost = sum(1 for i in ids if a[i][0] and not b[i])
            rows.append({"before": before, "after": after, "group": group, "n": len(ids), "gained": gained,
                         "lost": lost, "delta": (gained - lost) / len(ids) if ids else 0.0,
                         "p": mcnemar_exact(gained, lost)})
    return rows


def paired_table(rows: list[dict]) -> str:
    """paired_comparison's rows -> a Markdown table ("" without rows)."""
    if not rows:
        return ""
    lines = ["| before -> after | group | change | gained | lost | McNemar p |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_md(r['before'])} -> {_md(r['after'])} | {_md(r['group'])} | {r['delta']:+.3f} | "
                     f"{r['gained']}/{r['n']} | {r['lost']}/{r['n']} | {r['p']:.3g} |")
    return ("\n".join(lines) + "\n\nPaired on the same items: gained = wrong before and right after, lost = the "
            "reverse; p: McNemar's exact two-sided test of gained against lost.\n")


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pebr.eval", description=__doc__.split("\n\n")[0])
    # append: `--model A` keeps working (a list of one); `--model A --model B` compares them.
    p.add_argument("--model", action="append", default=None, metavar="DIR",
                   help="HF folder, stage folder (OUT/stageK: its latest checkpoint), checkpoints folder or its "
                        "`latest` file; give it several times to compare checkpoints on the same items")
    p.add_argument("--data", default=None, help="JSON/JSONL/parquet records (default: held-out procedural items)")
    add_fields(p, EvalConfig, only=("num_items", "kind", "difficulty", "seed", "temperature", "max_new_tokens"))
    p.add_argument("--output", default=None, help="responses JSONL (default: OUT/eval/<model path>_<kind>.jsonl); "
                                                  "the summary goes beside it (<stem>.summary.json, <stem>.md)")
    p.add_argument("--output-dir", default="runs", help="the run folder OUT, as for pebr.train (default: runs)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=device, help=f"cpu, cuda or cuda:N (default: {device})")
    p.add_argument("--compare", action="extend", nargs="+", default=[], metavar="JSON",
                   help="summaries written by earlier runs (<stem>.summary.json or compare_*.json): columns of the "
                        "comparison table, without re-running; unreadable files are skipped and reported")
    p.add_argument("--table", default=None, help="comparison table (Markdown, JSON beside it) when there are two or "
                                                 "more columns (default: OUT/eval/compare_<kind>.md)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals (default: 0.95)")
    return p


def _slug(model: str) -> str:
    rel = os.path.relpath(model)
    return os.path.normpath(model if rel.startswith("..") else rel).strip(os.sep).replace(os.sep, "_")


def _print_summary(model: str, summary: dict, out: str, summary_path: str) -> None:
    c = f"{summary['confidence']:.0%}"
    print(f"model {model}")
    print(f"accuracy {summary['accuracy']:.3f} (format {summary['format']:.3f}) on {summary['n']} items, "
          f"{c} interval [{summary['lo']:.3f}, {summary['hi']:.3f}]")
    for t, s in summary["by_type"].items():
        print(f"  {t:28s} {s['accuracy']:.3f}  (n={s['n']})  [{s['lo']:.3f}, {s['hi']:.3f}]")
    for k, s in summary["by_kind"].items():
        print(f"  {k + ' (all)':28s} {s['accuracy']:.3f}  (n={s['n']})  [{s['lo']:.3f}, {s['hi']:.3f}]")
    print(f"responses: {out}")
    print(f"summary: {summary_path}")
    print(json.dumps(summary))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pebr.data import tasks
    from pebr.run.checkpoint import resolve_model_path
    from pebr.run.cli import check_device
    from pebr.model.policy import load_policy

    models = args.model or []
    if not models and not args.compare:
        raise SystemExit("error: nothing to evaluate: give --model DIR (once per checkpoint) or --compare JSON ...")
    if args.output and len(models) > 1:
        raise SystemExit("error: --output names one responses file: with several --model leave it out "
                         "(each goes to OUT/eval/<model path>_<kind>.jsonl)")
    try:
        check_device(args.device)
        models = [resolve_model_path(m) for m in models]
        wilson_interval(0, 1, confidence=args.confidence)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")

    columns = []  # (label, summary): earlier runs first, then the models evaluated now
    skipped = 0
    for path in args.compare:
        try:
            columns += [(s["label"], s) for s in load_summaries(path)]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            skipped += 1
            print(f"skipped --compare {path}: {exc}", file=sys.stderr)
    if skipped:
        print(f"{skipped} of {len(args.compare)} --compare files skipped", file=sys.stderr)

    source = "data" if args.data else args.kind
    if models and not args.data and args.difficulty is None:
        from pebr.run.checkpoint import trained_difficulty

        args.difficulty = trained_difficulty(models[0])
        print(f"items at difficulty {args.difficulty} (the level {models[0]} was trained at; --difficulty to change)",
              file=sys.stderr)
    if models:
        if args.data:
            from pebr.data.records import load_records_or_exit

            res = load_records_or_exit(args.data)
            print(res.summary(), file=sys.stderr)
            items = res.items
        else:
            items = tasks.generate_items(args.num_items, seed=args.seed, kind=args.kind, difficulty=args.difficulty)
        if not items:
            raise SystemExit("error: no items to evaluate")
        ids = "\n".join(it.id for it in items)
        items_info = {"source": args.data or "procedural", "n": len(items),
                      "ids_digest": hashlib.sha1(ids.encode()).hexdigest()[:16],
                      **({} if args.data else {"kind": args.kind, "seed": args.seed, "difficulty": args.difficulty})}
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        from pebr.run.distributed import init_world

        world = init_world(device=args.device)
        results = []
        for model in models:  # every model answers the same items, from the same RNG state
            torch.manual_seed(world.rank)
            policy = load_policy(model, device=world.device)
            results.append((model, *evaluate(policy, items, max_new_tokens=args.max_new_tokens,
                                             temperature=args.temperature, world=world, confidence=args.confidence)))
            del policy
        world.close()
        if not world.is_main:
            return 0
        for model, summary, records in results:
            slug = _slug(model)
            out = args.output or os.path.join(args.output_dir, "eval", f"{slug}_{source}.jsonl")
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
            full = {"label": slug, "model": model, **summary, "items": items_info,
                    "decoding": {"greedy": args.temperature <= 0, "temperature": args.temperature,
                                 "max_new_tokens": args.max_new_tokens},
                    "responses": out}
            _write_json(stem + ".summary.json", full)
            _write_text(stem + ".md", f"# pebr.eval: {_md(model)}\n\n{comparison_table([(slug, full)])}")
            _print_summary(model, summary, out, stem + ".summary.json")
            columns.append((slug, full))
    if not columns:
        raise SystemExit("error: nothing to compare: every --compare file was skipped")
    if len(columns) > 1 or not models:
        table = args.table or os.path.join(args.output_dir, "eval", f"compare_{source if models else 'runs'}.md")
        paired = paired_comparison([(_slug(m), records) for m, _, records in results]) if models else []
        text = comparison_table(columns)
        if paired:
            text += "\n" + paired_table(paired)
        stem = table[: -len(".md")] if table.endswith(".md") else table
        _write_text(stem + ".md", f"# pebr.eval: {len(columns)} checkpoints\n\n{text}")
        _write_json(stem + ".json", {"confidence": args.confidence, "labels": [label for label, _ in columns],
                                     "models": [{**s, "label": label} for label, s in columns], "paired": paired})
        print(text, end="")
        print(f"table: {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
