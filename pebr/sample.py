"""`python -m pebr.sample`: dataset-level sampling on its own (the trainer runs it too, cached).

k rollouts per item, each graded by accuracy; items with k/k correct are easy, 1..k-1 medium,
0 hard. Writes OUT/rollouts.jsonl (one line per response) and OUT/splits.json (counts, ids).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from pebr.cli import add_fields
from pebr.config import SamplingConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pebr.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder (default: the latest stage-0 checkpoint under runs/)")
    p.add_argument("--data", default=None, help="JSON/JSONL/parquet records (default: built-in procedural items)")
    add_fields(p, SamplingConfig, shown=SamplingConfig(num_items=128), aliases={"k": ["-k"]},
               only=("num_items", "seed", "k", "temperature", "top_p", "batch_prompts"))
    p.add_argument("--max-new-tokens", type=int, default=96, help="response budget in tokens (default: 96)")
    p.add_argument("--output-dir", default="runs/sampling", help="where rollouts.jsonl and splits.json go (default: runs/sampling)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=device, help=f"cpu or cuda (default: {device})")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pebr import tasks
    from pebr.checkpoint import Checkpointer
    from pebr.policy import load_policy
    from pebr.sampling import sample_dataset, write_sampling

    model = args.model or Checkpointer(os.path.join("runs", "stage0", "checkpoints")).latest()
    if not model:
        raise SystemExit("error: no --model and no stage-0 checkpoint under runs/stage0; run `python -m pebr.train --stage 0` first")
    if args.data:
        from pebr.data import load_records

        res = load_records(args.data)
        print(res.summary(), file=sys.stderr)
        items = res.items
    else:
        items = tasks.generate_items(args.num_items, seed=args.seed, kind="mixed")
    if not items:
        raise SystemExit("error: no items to sample")
    from pebr.distributed import init_world

    world = init_world(device=args.device)
    torch.manual_seed(args.seed + 1_000_003 * world.rank)
    policy = load_policy(model, device=world.device)
    result = sample_dataset(policy, items, k=args.k, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, batch_prompts=args.batch_prompts,
                            progress=world.is_main, world=world)
    world.close()
    if not world.is_main:
        return 0
    write_sampling(result, args.output_dir, meta={"model": os.path.abspath(model), "data": args.data, "k": args.k})
    n = len(items)
    counts = result.counts
    print(f"{n} items x k={args.k}: " + ", ".join(f"{s} {c} ({100 * c / n:.0f}%)" for s, c in counts.items()))
    print(f"wrote {os.path.join(args.output_dir, 'rollouts.jsonl')} and {os.path.join(args.output_dir, 'splits.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
