"""Where one GRPO step of the tiny default spends its time, phase by phase.

    python -m bench.profile_step                          # fresh tiny policy (it answers at full length)
    python -m bench.profile_step --model runs/stage0      # a warmed-up policy (realistic lengths)
    python -m bench.profile_step --no-shared-prefix       # the update with every sequence run whole
    python -m bench.profile_step --old-logprobs recompute # a policy pass for the old log-probs every step

Runs `--steps` GRPO steps of the tiny stage-1 preset (16 prompts x n = 8, 2 updates of 8 prompts,
max 96 new tokens) on the built-in items and prints, per step, the wall time of: rollout prefill
(one forward over the step's prompts, timed separately: transformers' generate does not report
it), rollout (prefill + decode, as the trainer runs it), rewards, old log-probs (two updates a
step need them: a policy pass with --old-logprobs recompute; by default the rollout's, after the
first step's check), reference log-probs, policy forward, loss + backward, and the optimizer
(clip + AdamW). The first step is a warm-up and is not averaged. Name the CPU and ISA beside any
figure you quote (the last line prints them).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections import defaultdict

import torch

from pebr.run.machine import cpu_name  # scripts also import it from here, where it lived

PHASES = ("rollout", "rollout_prefill_once", "rewards", "old_logprobs", "reference", "policy_forward", "loss_backward", "optimizer")


class PhaseTimer:
    """Accumulates wall seconds per phase name. On CUDA it waits for the device at each phase's
    start and end: kernels are asynchronous, and without the wait a phase's GPU work would be
    counted in whichever later phase first waits for it."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.total = defaultdict(float)
        self.cuda = torch.device(device).type == "cuda"

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.total[name] += time.perf_counter() - t0


def instrument(trainer, timer: PhaseTimer) -> None:
    """Wrap the trainer's phases (rollout, score, _logprobs, the optimizer) with `timer`."""
    rollout, score, logprobs = trainer.rollout, trainer.score, trainer._logprobs
    fbs, minibatch = trainer.forward_backward_step, trainer.minibatch_step

    def timed_rollout(items):
        with timer("rollout"):
            return rollout(items)

    def timed_score(ro):
        with timer("rewards"):
            return score(ro)

    def timed_logprobs(which, *a, **k):
        name = "reference" if which == "reference" else ("policy_forward" if k.get("grad") else "old_logprobs")
        with timer(name):
            return logprobs(which, *a, **k)

    def timed_fbs(*a, **k):
        inner = timer.total["reference"] + timer.total["policy_forward"]
        timer._sync()
        t0 = time.perf_counter()
        out = fbs(*a, **k)
        timer._sync()
        spent = time.perf_counter() - t0
        timer.total["_fbs"] += spent
        timer.total["loss_backward"] += spent - (timer.total["reference"] + timer.total["policy_forward"] - inner)
        return out

    def timed_minibatch(*a, **k):
        # the optimizer's share: the mini-batch step less its forward/backward passes (clip + AdamW + zero_grad)
        inner = timer.total["_fbs"]
        timer._sync()
        t0 = time.perf_counter()
        out = minibatch(*a, **k)
        timer._sync()
        timer.total["optimizer"] += time.perf_counter() - t0 - (timer.total["_fbs"] - inner)
        return out

    trainer.rollout, trainer.score, trainer._logprobs = timed_rollout, timed_score, timed_logprobs
    trainer.forward_backward_step, trainer.minibatch_step = timed_fbs, timed_minibatch


def prefill_once(trainer, items, timer: PhaseTimer) -> None:
    """One forward over the step's prompts (each once), timed: the prefill a shared-prefix rollout does."""
    from pebr.model.forward import encoder_outputs, image_features

    policy = trainer.policy
    prompt = policy.encode_prompts([it.images for it in items], [it.problem for it in items])
    with torch.no_grad(), timer("rollout_prefill_once"):
        feats = image_features(policy.model, prompt.pixel_values, prompt.image_grid_thw)
        policy.model.model(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                           image_grid_thw=prompt.image_grid_thw, mm_token_type_ids=prompt.mm_token_type_ids,
                           mm_encoder_outputs=encoder_outputs(feats, 1, prompt.images_per_prompt), use_cache=True)


def _start_profiler(device: torch.device):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=acts)
    prof.__enter__()
    return prof


def _stop_profiler(prof, path: str, device: torch.device) -> None:
    """Ends the profile, writes its Chrome trace to `path` and prints the ops and ranges that took longest."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    prof.__exit__(None, None, None)
    prof.export_chrome_trace(path)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"trace: {path} (open in https://ui.perfetto.dev or chrome://tracing)")
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=48))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF folder, stage folder (OUT/stageK: its latest checkpoint) or checkpoints folder (default: a fresh tiny policy)")
    ap.add_argument("--steps", type=int, default=3, help="steps to run; the first is a warm-up")
    ap.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=True,
                    help="the update's shared-prefix path (pebr/model/shared_prefix.py)")
    ap.add_argument("--old-logprobs", choices=("rollout", "recompute"), default="rollout",
                    help="old log-probs from the rollout (checked on the first step) or a policy pass each step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is usable)")
    ap.add_argument("--rollout-batch", type=int, default=None, help="prompts a step (default: the tiny preset's 16)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="response budget (default: the tiny preset's 96)")
    ap.add_argument("--trace", default=None, metavar="PATH",
                    help="also write a PyTorch profiler Chrome trace (CPU, and CUDA on a GPU) of the steps after the "
                         "first to PATH; the NVTX ranges (engine/nvtx.py) appear in it by name")
    args = ap.parse_args(argv)

    from pebr.recipe import config as C
    from pebr.run.distributed import World
    from pebr.trainers.grpo import GRPOTrainer
    from pebr.run.model_path import resolve_model_path
    from pebr.model.policy import build_tiny_policy, load_policy
    from pebr.rewards import PerceptionWeights, perception_reward
    from pebr.data.tasks import generate_items

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = dataclasses.replace(C.preset("tiny", stage=1), max_steps=args.steps, shared_prefix=args.shared_prefix,
                              old_logprobs=args.old_logprobs, progress=False, save_every=10**9)
    if args.rollout_batch:
        cfg = dataclasses.replace(cfg, rollout_batch=args.rollout_batch, mini_batch=min(cfg.mini_batch, args.rollout_batch))
    if args.max_new_tokens:
        cfg = dataclasses.replace(cfg, max_new_tokens=args.max_new_tokens)
    torch.manual_seed(args.seed)
    # --model takes what pebr.train's does: an HF folder, a stage folder (its latest checkpoint), ...
    load = (lambda: load_policy(resolve_model_path(args.model))) if args.model else (lambda: build_tiny_policy(seed=args.seed))
    policy, reference = load(), load()
    policy.model.to(device)
    reference.model.to(device)
    reference.model.eval().requires_grad_(False)
    items = generate_items(cfg.rollout_batch * args.steps, seed=args.seed + 1)
    weights = PerceptionWeights()
    reward = lambda text, item, k: perception_reward(text, item, num_tokens=k, weights=weights)  # noqa: E731
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = GRPOTrainer(cfg, policy=policy, reference=reference, items=items, reward_fn=reward,
                              run_dir=run_dir, init_model=None, world=World(), log=lambda *a, **k: None)
        trainer.save = lambda **_: None
        timer = PhaseTimer(device)
        instrument(trainer, timer)
        rows = []
        profiler = None
        for i in range(args.steps):
            if args.trace and i == min(1, args.steps - 1):  # after the warm-up step, when there is one
                profiler = _start_profiler(device)
            before = dict(timer.total)
            timer._sync()
            t0 = time.perf_counter()
            m = trainer.train_step()
            timer._sync()
            step = time.perf_counter() - t0
            prefill_once(trainer, items[: cfg.rollout_batch], timer)
            spent = {k: v - before.get(k, 0.0) for k, v in timer.total.items()}
            rows.append((step, spent, m.get("response_length", float("nan"))))
        if profiler is not None:
            _stop_profiler(profiler, args.trace, device)
    measured = rows[1:] or rows
    print(f"device={device}  shared_prefix={args.shared_prefix}  old_logprobs={args.old_logprobs}  "
          f"model={args.model or 'fresh tiny policy'}  "
          f"steps averaged: {len(measured)} (of {len(rows)})")
    print(f"{'phase':<22}{'seconds/step':>14}{'share':>8}")
    step_mean = sum(r[0] for r in measured) / len(measured)
    for name in PHASES:
        v = sum(r[1].get(name, 0.0) for r in measured) / len(measured)
        share = "" if name == "rollout_prefill_once" else f"{100 * v / step_mean:6.1f}%"
        print(f"{name:<22}{v:14.3f}{share:>8}")
    print(f"{'step (wall)':<22}{step_mean:14.3f}")
    print(f"mean response length {sum(r[2] for r in measured) / len(measured):.1f} tokens; "
          f"CPU: {cpu_name()}, ATen capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
