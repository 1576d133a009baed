"""`python -m pebr.sample`: dataset-level sampling on its own (the trainer runs it too, cached).

k rollouts per item, each graded by accuracy; items with k/k correct are easy, 1..k-1 medium,
0 hard. Writes OUT/sampling/rollouts.jsonl (one line per response) and OUT/sampling/splits.json
(counts, ids, and the settings it was drawn with): the cache `python -m pebr.train --stage 1
--output-dir OUT` reuses when its model, items, k, temperature, top_p and max_new_tokens match.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from pebr.errors import MissingPolicyError
from pebr.recipe.config import DIFFICULTY_LEVELS, PRESETS, SamplingConfig
from pebr.recipe.config import preset as config_preset
from pebr.rollout.factory import ROLLOUT_ENGINES
from pebr.run.cli import add_fields, add_generation_flags, check_device, errors_as_exit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pebr.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="HF folder, stage folder (OUT/stageK) or checkpoints folder (default: OUT/stage0's latest checkpoint)")
    p.add_argument("--data", default=None, help="JSON/JSONL/parquet records (default: built-in procedural items)")
    add_fields(p, SamplingConfig, shown=SamplingConfig(num_items=128), aliases={"k": ["-k"]},
               only=("num_items", "seed", "k", "temperature", "top_p", "batch_prompts"))
    p.add_argument("--max-new-tokens", type=int, default=96, help="response budget in tokens (default: 96)")
    p.add_argument("--difficulty", default=None, choices=DIFFICULTY_LEVELS,
                   help="built-in items: objects per scene and colours, as pebr.train --difficulty (default: the level "
                        "the model was trained at, from its trainer_state.json; standard for a folder without one)")
    p.add_argument("--rollout-seed", type=int, default=None,
                   help="seed of the rollouts' random draws (default: --seed; pebr.train seeds them with its own "
                        "--seed, which --preset takes)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="take the sampling settings pebr.train uses under this preset (k, items, temperature, top-p, "
                        "batch, seed, max new tokens) for every flag not given: `--preset tiny` reproduces the "
                        "sampling a default `pebr.train --stage 1` cached (default: none, the flags' defaults above)")
    p.add_argument("--output-dir", default="runs",
                   help="the run folder OUT, as for pebr.train: the result goes to OUT/sampling (a path that ends in "
                        "'sampling' is taken as that folder itself) (default: runs)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=device, help=f"cpu, cuda or cuda:N (default: {device})")
    add_generation_flags(p, ROLLOUT_ENGINES)
    return p


def sampling_folder(output_dir: str) -> str:
    """OUT/sampling; `--output-dir runs/sampling` (the flag's former meaning) stays that folder."""
    return output_dir if os.path.basename(os.path.normpath(output_dir)) == "sampling" else os.path.join(output_dir, "sampling")


def apply_preset(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """args with every sampling flag not on the command line taken from `--preset`'s stage-1 config."""
    if not args.preset:
        return args
    cfg = config_preset(args.preset, 1)
    values = {"num_items": cfg.sampling.num_items, "seed": cfg.sampling.seed, "k": cfg.sampling.k,
              "temperature": cfg.sampling.temperature, "top_p": cfg.sampling.top_p,
              "batch_prompts": cfg.sampling.batch_prompts, "max_new_tokens": cfg.max_new_tokens}
    flags = {"num_items": ["--num-items"], "seed": ["--seed"], "k": ["-k", "--k"], "temperature": ["--temperature"],
             "top_p": ["--top-p"], "batch_prompts": ["--batch-prompts"], "max_new_tokens": ["--max-new-tokens"]}
    values["rollout_seed"] = cfg.seed  # pebr.train draws its sampling rollouts under the run's seed
    flags["rollout_seed"] = ["--rollout-seed"]
    for dest, value in values.items():
        if not any(a == f or a.startswith(f + "=") for a in argv for f in flags[dest]):
            setattr(args, dest, value)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = apply_preset(build_parser().parse_args(argv), argv)
    with errors_as_exit(settings=True):
        from pebr.recipe.splits import SAMPLING_NOT_KEPT
        from pebr.run.signals import stop_on_signals

        with stop_on_signals("dataset-level sampling", then=SAMPLING_NOT_KEPT):  # one line, exit 143 / 130
            return _sample(args)


def _sample(args: argparse.Namespace) -> int:
    from pebr.run.checkpoint import find_latest
    from pebr.run.model_path import hold_model_path

    folder = sampling_folder(args.output_dir)
    run_dir = os.path.dirname(os.path.normpath(folder)) or "."
    check_device(args.device)
    if args.model:
        held = hold_model_path(args.model)  # a training run's latest checkpoint, kept from pruning until loaded
    else:
        stage0 = os.path.join(run_dir, "stage0", "checkpoints")
        if not find_latest(stage0):
            raise MissingPolicyError(f"no --model and no stage-0 checkpoint under {os.path.join(run_dir, 'stage0')}; "
                                     f"run `python -m pebr.train --stage 0 --output-dir {run_dir}` first")
        held = hold_model_path(stage0)
    try:
        return _sample_held(args, held, folder)
    finally:
        held.release()


def _sample_held(args: argparse.Namespace, held, folder: str) -> int:
    from pebr.recipe.builder import load_rollout_policy
    from pebr.recipe.items import read_items
    from pebr.recipe.paths import trained_difficulty, trained_image_size
    from pebr.recipe.splits import sample_dataset, sampling_meta, write_sampling
    from pebr.run.distributed import init_world, seed_all
    from pebr.run.lock import hold

    model = held.path
    if not args.data and args.difficulty is None:
        args.difficulty = trained_difficulty(model)
    image_size = args.image_size or trained_image_size(model)
    items = read_items(args.data, num_items=args.num_items, seed=args.seed, difficulty=args.difficulty,
                       image_size=image_size, log=lambda m: print(m, file=sys.stderr))
    world = init_world(device=args.device)
    rollout_seed = args.seed if args.rollout_seed is None else args.rollout_seed
    seed_all(rollout_seed, world.rank)
    policy, engine = load_rollout_policy(model, device=world.device, rollout_engine=args.rollout_engine)
    held.release()  # in memory now: its run may prune it
    # the folder is the trainer's sampling cache too: one writer at a time (pebr/run/lock.py)
    with hold(folder, world, log=lambda m: print(m, file=sys.stderr)):
        result = sample_dataset(policy, items, k=args.k, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, batch_prompts=args.batch_prompts,
                                progress=world.is_main, world=world, engine=engine)
        if world.is_main:
            # what pebr.recipe.splits.ensure_sampling compares before reusing this sampling
            write_sampling(result, folder, meta=sampling_meta(
                model=model, data=args.data, k=args.k, num_items=len(items), temperature=args.temperature,
                top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=rollout_seed))
    world.close()
    if not world.is_main:
        return 0
    n = len(items)
    counts = result.counts
    print(f"{n} items x k={args.k}: " + ", ".join(f"{s} {c} ({100 * c / n:.0f}%)" for s, c in counts.items()))
    print(f"wrote {os.path.join(folder, 'rollouts.jsonl')} and {os.path.join(folder, 'splits.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
