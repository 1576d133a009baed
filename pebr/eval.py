"""`python -m pebr.eval --model DIR [--data PATH]`: accuracy with the training grader, by task type.

DIR: an HF folder, a stage folder (runs/stage2: its latest checkpoint), a checkpoints folder or
its `latest` file. Without --data: held-out procedural items (seed 999, distinct from every
training pool). Greedy decoding by default. Responses are saved as JSONL (--output; default
OUT/eval/, OUT the run folder --output-dir).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

from pebr.cli import add_fields
from pebr.config import EvalConfig


def evaluate(policy, items: list, *, max_new_tokens: int = 96, temperature: float = 0.0, batch_prompts: int = 32,
             world=None) -> tuple[dict, list[dict]]:
    """-> (summary {"accuracy", "format", "n", "by_type": {type: {"accuracy", "n"}}}, one record per item).

    world: a pebr.distributed.World: each rank answers items[rank::world_size]; every rank gets the
    merged records in item order."""
    from pebr.rewards import accuracy_reward, format_reward
    from pebr.rollout import generate_rollouts

    records = []
    W = world.world_size if world is not None else 1
    mine = items[world.rank :: W] if W > 1 else items
    for c0 in range(0, len(mine), batch_prompts):
        batch = mine[c0 : c0 + batch_prompts]
        ro = generate_rollouts(policy, batch, n=1, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens)
        for item, text, k in zip(batch, ro.texts, ro.num_tokens):
            records.append({
                "id": item.id, "task_type": item.task_type, "problem": item.problem, "answer": item.answer,
                "response": text, "num_tokens": k, "correct": accuracy_reward(text, item.answer) >= 1.0,
                "format": format_reward(text),
            })
    if W > 1:
        position = {it.id: i for i, it in enumerate(items)}
        records = sorted((r for part in world.gather_objects(records) for r in part), key=lambda r: position[r["id"]])
    by = defaultdict(list)
    for r in records:
        by[r["task_type"]].append(r["correct"])
    n = max(len(records), 1)
    summary = {
        "accuracy": sum(r["correct"] for r in records) / n,
        "format": sum(r["format"] for r in records) / n,
        "n": len(records),
        "by_type": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(by.items())},
    }
    return summary, records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pebr.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="HF folder, stage folder (OUT/stageK: its latest checkpoint), checkpoints folder or its `latest` file")
    p.add_argument("--data", default=None, help="JSON/JSONL/parquet records (default: held-out procedural items)")
    add_fields(p, EvalConfig, only=("num_items", "kind", "seed", "temperature", "max_new_tokens"))
    p.add_argument("--output", default=None, help="responses JSONL (default: OUT/eval/<model path>_<kind>.jsonl)")
    p.add_argument("--output-dir", default="runs", help="the run folder OUT, as for pebr.train (default: runs)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=device, help=f"cpu, cuda or cuda:N (default: {device})")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pebr import tasks
    from pebr.checkpoint import resolve_model_path
    from pebr.cli import check_device
    from pebr.policy import load_policy

    try:
        check_device(args.device)
        model = resolve_model_path(args.model)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")

    if args.data:
        from pebr.data import load_records

        res = load_records(args.data)
        print(res.summary(), file=sys.stderr)
        items = res.items
    else:
        items = tasks.generate_items(args.num_items, seed=args.seed, kind=args.kind)
    if not items:
        raise SystemExit("error: no items to evaluate")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from pebr.distributed import init_world

    world = init_world(device=args.device)
    torch.manual_seed(world.rank)
    policy = load_policy(model, device=world.device)
    summary, records = evaluate(policy, items, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                world=world)
    world.close()
    if not world.is_main:
        return 0
    rel = os.path.relpath(model)
    slug = os.path.normpath(model if rel.startswith("..") else rel).strip(os.sep).replace(os.sep, "_")
    out = args.output or os.path.join(args.output_dir, "eval", f"{slug}_{'data' if args.data else args.kind}.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"model {model}")
    print(f"accuracy {summary['accuracy']:.3f} (format {summary['format']:.3f}) on {summary['n']} items")
    for t, s in summary["by_type"].items():
        print(f"  {t:28s} {s['accuracy']:.3f}  (n={s['n']})")
    print(f"responses: {out}")
    print(json.dumps({k: v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
