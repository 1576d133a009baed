"""What the old log-probs' source costs the update: `--old-logprobs rollout` against `recompute`.

    python -m bench.update_ab --model runs/stage0        # a warmed-up policy (realistic lengths)
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.update_ab ...

One set of tiny-default rollouts (16 prompts x n = 8, at most 96 new tokens) goes through
`GRPOTrainer.update` (two mini-batches, so old log-probs are needed) `--repeats` times in each
mode, the two modes interleaved (ABBA...) and a small rollout run before every update, as
training runs one, so that drift in the machine's speed and the allocator's state fall on both
alike. A whole-step profile (bench.profile_step) varies by 10-20% from run to run on a shared
machine; this compares the update alone. Prints the median and every time; the first round is a
warm-up and is not counted. Name the CPU and ISA beside any figure you quote (printed last).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF folder, stage folder (OUT/stageK: its latest checkpoint) or checkpoints folder (default: a fresh tiny policy)")
    ap.add_argument("--repeats", type=int, default=8, help="timed updates per mode")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from pebr.run.machine import cpu_name
    from pebr.recipe import config as C
    from pebr.run.distributed import World
    from pebr.trainers.grpo import GRPOTrainer
    from pebr.run.model_path import resolve_model_path
    from pebr.model.policy import build_tiny_policy, load_policy
    from pebr.rollout.hf_engine import generate_rollouts
    from pebr.data.tasks import generate_items

    cfg = dataclasses.replace(C.preset("tiny", stage=1), progress=False)
    # --model takes what pebr.train's does: an HF folder, a stage folder (its latest checkpoint), ...
    load = (lambda: load_policy(resolve_model_path(args.model))) if args.model else (lambda: build_tiny_policy(seed=args.seed))
    policy, reference = load(), load()
    reference.model.eval().requires_grad_(False)
    items = generate_items(cfg.rollout_batch, seed=args.seed + 1)
    torch.manual_seed(args.seed)
    ro = generate_rollouts(policy, items, n=cfg.group_size, temperature=cfg.temperature,
                           max_new_tokens=cfg.max_new_tokens)
    adv = torch.randn(len(ro.texts), generator=torch.Generator().manual_seed(args.seed))
    times: dict[str, list[float]] = {"rollout": [], "recompute": []}
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = GRPOTrainer(cfg, policy=policy, reference=reference, items=items, reward_fn=None, run_dir=run_dir,
                              init_model=None, world=World(), log=lambda *a, **k: None)
        trainer._rollout_old_ok = True  # past the first step's check: what every later step does
        for r in range(args.repeats + 1):
            for mode in (("rollout", "recompute") if r % 2 else ("recompute", "rollout")):
                trainer.cfg = dataclasses.replace(cfg, old_logprobs=mode)
                generate_rollouts(policy, items[:4], n=cfg.group_size, temperature=cfg.temperature, max_new_tokens=32)
                t0 = time.perf_counter()
                trainer.update(ro, adv)
                if r:
                    times[mode].append(time.perf_counter() - t0)
    for mode, v in times.items():
        print(f"--old-logprobs {mode:<9} update median {statistics.median(v):.3f} s  "
              f"({', '.join(f'{x:.2f}' for x in v)})")
    print(f"{sum(ro.num_tokens) / len(ro.num_tokens):.1f} tokens a response; CPU: {cpu_name()}, ATen capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
