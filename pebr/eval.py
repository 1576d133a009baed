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

import torch

from pebr.errors import ConfigError
from pebr.recipe.config import EvalConfig
from pebr.recipe.evaluate import evaluate  # noqa: F401  (scripts import it from here)
from pebr.report.eval_tables import (  # noqa: F401
    comparison_table,
    complete_summary,
    load_summaries,
    md,
    paired_comparison,
    paired_table,
    proportion,
    summarize,
)
from pebr.report.stats import wilson_interval
from pebr.rollout.factory import ROLLOUT_ENGINES
from pebr.run.cli import add_fields, add_generation_flags, check_device, errors_as_exit


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
    add_generation_flags(p, ROLLOUT_ENGINES)
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
    with errors_as_exit(settings=True):
        return _evaluate_main(args)


def _evaluate_main(args: argparse.Namespace) -> int:
    from pebr.run.model_path import hold_model_path

    held = []  # each model kept from its run's pruning from being resolved until it is loaded
    try:
        return _evaluate_held(args, held, hold_model_path)
    finally:
        for h in held:
            h.release()


def _evaluate_held(args: argparse.Namespace, held: list, hold_model_path) -> int:
    from pebr.recipe.builder import load_rollout_policy
    from pebr.recipe.items import read_items

    models = args.model or []
    if not models and not args.compare:
        raise ConfigError("nothing to evaluate: give --model DIR (once per checkpoint) or --compare JSON ...")
    if args.output and len(models) > 1:
        raise ConfigError("--output names one responses file: with several --model leave it out "
                          "(each goes to OUT/eval/<model path>_<kind>.jsonl)")
    check_device(args.device)
    for m in models:
        held.append(hold_model_path(m))  # a training run's latest checkpoint, kept until loaded
    models = [h.path for h in held]
    wilson_interval(0, 1, confidence=args.confidence)

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
        from pebr.recipe.paths import trained_difficulty

        args.difficulty = trained_difficulty(models[0])
        print(f"items at difficulty {args.difficulty} (the level {models[0]} was trained at; --difficulty to change)",
              file=sys.stderr)
    if models:
        from pebr.recipe.paths import trained_image_size

        image_size = args.image_size or trained_image_size(models[0])
        items = read_items(args.data, num_items=args.num_items, seed=args.seed, kind=args.kind,
                           difficulty=args.difficulty or "standard", image_size=image_size,
                           log=lambda m: print(m, file=sys.stderr))
        ids = "\n".join(it.id for it in items)
        items_info = {"source": args.data or "procedural", "n": len(items),
                      "ids_digest": hashlib.sha1(ids.encode()).hexdigest()[:16],
                      **({} if args.data else {"kind": args.kind, "seed": args.seed, "difficulty": args.difficulty,
                                               "image_size": image_size})}
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        from pebr.run.distributed import init_world

        world = init_world(device=args.device)
        results = []
        for model, h in zip(models, held):  # every model answers the same items, from the same RNG state
            torch.manual_seed(world.rank)
            policy, engine = load_rollout_policy(model, device=world.device, rollout_engine=args.rollout_engine)
            h.release()  # in memory now: its run may prune it
            results.append((model, *evaluate(policy, items, max_new_tokens=args.max_new_tokens, engine=engine,
                                             temperature=args.temperature, world=world, confidence=args.confidence)))
            del policy, engine
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
            _write_text(stem + ".md", f"# pebr.eval: {md(model)}\n\n{comparison_table([(slug, full)])}")
            _print_summary(model, summary, out, stem + ".summary.json")
            columns.append((slug, full))
    if not columns:
        raise ConfigError("nothing to compare: every --compare file was skipped")
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
