"""One GRPO step at real widths: memory split into model states and working memory, and phases.

    python -m bench.real_shapes                                   # 3B widths, 1 and 2 decoder layers, fp32
    python -m bench.real_shapes --layers 1 2 4 --dtype float32 bfloat16 --tokens 512 -n 8
    python -m bench.real_shapes --size qwen2.5-vl-7b --layers 1 2

Each configuration runs in a fresh process (so one's memory cannot hide in another's high-water
mark): a random-init policy and its reference at the published widths (pebr.model.sizes), depth
cut to L decoder layers and B vision blocks, one prompt with a 448 x 448 built-in image (256 image
tokens), n responses of exactly T tokens (a random-init policy never ends early; the vision and
padding ids are never sampled), and one GRPO step of the paper preset's loss (clip 0.2/0.3, dual
clip 3, low_var_kl 1e-2 against the reference, token-mean) with AdamW, through pebr's own trainer.

Memory: the process's resident set is sampled every 20 ms by a thread. "model states" are counted
from the tensors, not guessed: policy weights, gradients (as many bytes as the trainable weights),
AdamW's two moments, the reference's weights. "working" is the step's peak RSS minus the RSS
before the step minus what the step adds to the states (gradients, AdamW's moments on the first
step): what the rollout, the reference pass, activations, the loss and the optimizer's own
temporaries take above the model states at the step's peak. Time: the trainer's own phases
(rollout, update). A line per configuration, then the per-layer slope fitted over the depths run
and extrapolated to the full depth (labelled as extrapolated: only what was run is measured).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import threading
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """The largest resident set seen by a 20 ms poller since the last `reset`."""

    def __init__(self):
        self.peak, self._stop = _rss_bytes(), False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.02)

    def reset(self) -> int:
        self.peak = _rss_bytes()
        return self.peak

    def stop(self):
        self._stop = True
        self._thread.join()


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_one(size: str, layers: int, blocks: int, dtype: str, n: int, tokens: int, image_size: int, seed: int,
            lora_rank: int | None = None) -> dict:
    """One configuration, in this process -> its figures. lora_rank: LoRA adapters (PEFT, fp32) on the
    decoder's projections of a frozen base in `dtype`, the reference the base itself (no second model)."""
    import torch

    from pebr.data.tasks import generate_items
    from pebr.model.sizes import build_sized_policy
    from pebr.recipe import config as C
    from pebr.run.distributed import World
    from pebr.run.machine import describe
    from pebr.trainers.grpo import GRPOTrainer

    base = _rss_bytes()
    poll = RssPeak()
    torch.manual_seed(seed)
    policy = build_sized_policy(size, text_layers=layers, vision_blocks=blocks, seed=seed, image_size=image_size)
    reference = build_sized_policy(size, text_layers=layers, vision_blocks=blocks, seed=seed, image_size=image_size)
    torch_dtype = getattr(torch, dtype)
    policy.model.to(dtype=torch_dtype)
    reference.model.to(dtype=torch_dtype).eval().requires_grad_(False)
    if lora_rank:
        from pebr.model.lora import add_lora

        del reference  # LoRA's reference is the policy with its adapters off
        reference = None
        policy.adapter = add_lora(policy.model, rank=lora_rank, alpha=2.0 * lora_rank)
    item = generate_items(1, seed=seed, image_size=image_size)[0]
    cfg = dataclasses.replace(C.preset("paper", 2), dtype=dtype, group_size=n, rollout_batch=1, mini_batch=1,
                              micro_batch=n, max_new_tokens=tokens, temperature=1.0, top_p=1.0, progress=False,
                              max_steps=1, model_size=size, text_layers=layers, vision_blocks=blocks,
                              lora=C.LoRAConfig(rank=lora_rank))
    reward = lambda text, it, k: {"overall": random.random()}  # noqa: E731  (every group carries a signal)
    trainer = GRPOTrainer(cfg, policy=policy, reference=reference, items=[item], reward_fn=reward,
                          run_dir="/tmp/bench_real_shapes", init_model=None, world=World(), log=lambda m: None)
    weights = _tensor_bytes(policy.model.parameters())
    trainable = _tensor_bytes(p for p in policy.model.parameters() if p.requires_grad)
    ref_weights = _tensor_bytes(reference.model.parameters()) if reference is not None else 0
    before = poll.reset()
    t0 = time.perf_counter()
    m = trainer.train_step()
    wall = time.perf_counter() - t0
    peak = poll.peak
    poll.stop()
    adam = _tensor_bytes(t for s in trainer.opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    states = weights + trainable + adam + ref_weights
    image_tokens = int(policy.images.num_tokens(policy.images([item.image])[1]).sum())
    return {
        "size": size, "layers": layers, "vision_blocks": blocks, "dtype": dtype, "n": n, "tokens": tokens,
        "lora_rank": lora_rank, "trainable_params": sum(p.numel() for p in policy.model.parameters() if p.requires_grad),
        "image_tokens": image_tokens, "params": sum(p.numel() for p in policy.model.parameters()),
        "response_tokens": n * m["response_length"],
        "gib": {"weights": weights / 2**30, "gradients": trainable / 2**30, "adamw": adam / 2**30,
                "reference": ref_weights / 2**30, "states": states / 2**30,
                "peak_rss": peak / 2**30, "rss_before_step": before / 2**30, "process_base": base / 2**30,
                "working": (peak - before - adam - trainable) / 2**30},
        "seconds": {"step": wall, "rollout": m["rollout_s"], "update": m.get("update_s", float("nan"))},
        "tokens_per_s": m["tokens_per_s"], "loss": m["loss"], "machine": describe("cpu"),
    }


def _fit(xs, ys):
    """Least-squares line y = a + b x -> (a, b); one point: (y, 0)."""
    if len(xs) < 2:
        return ys[0], 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.real_shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="qwen2.5-vl-3b", choices=("qwen2.5-vl-3b", "qwen2.5-vl-7b"))
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="decoder layers, one run each (default: 1 2)")
    p.add_argument("--vision-blocks", type=int, default=1, help="vision blocks (default: 1)")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=("float32", "bfloat16"))
    p.add_argument("-n", type=int, default=8, help="responses per prompt (default: 8, the paper's)")
    p.add_argument("--tokens", type=int, default=256, help="response length in tokens (default: 256)")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-rank", type=int, nargs="+", default=[0],
                   help="0: full fine-tuning; R: LoRA rank R on the decoder (frozen base, reference = adapters off); "
                        "one run per value (default: 0)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process's mode
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.size, args.layers[0], args.vision_blocks, args.dtype[0], args.n, args.tokens,
                                 args.image_size, args.seed, lora_rank=args.lora_rank[0] or None)))
        return 0
    from pebr.model.sizes import REAL_SIZES

    rows = []
    for dtype, rank, layers in ((d, r, L) for d in args.dtype for r in args.lora_rank for L in args.layers):
        cmd = [sys.executable, "-m", "bench.real_shapes", "--one", "--size", args.size, "--layers", str(layers),
               "--vision-blocks", str(args.vision_blocks), "--dtype", dtype, "-n", str(args.n), "--tokens",
               str(args.tokens), "--image-size", str(args.image_size), "--seed", str(args.seed),
               "--lora-rank", str(rank)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        mode = f"LoRA r={rank}" if rank else "full fine-tuning"
        if out.returncode != 0:
            print(f"{dtype} {layers} layers {mode}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        g, s = r["gib"], r["seconds"]
        print(f"{r['size']} {layers} layers {r['vision_blocks']} vision block(s) {dtype} {mode} "
              f"({r['trainable_params'] / 1e6:.1f}M trainable): {r['params'] / 1e6:.0f}M params, "
              f"1 prompt ({r['image_tokens']} image tokens) x n={r['n']} x {r['tokens']} tokens | states "
              f"{g['states']:.2f} GiB (weights {g['weights']:.2f}, grads {g['gradients']:.2f}, AdamW {g['adamw']:.2f}, "
              f"reference {g['reference']:.2f}) | working {g['working']:.2f} GiB | peak RSS {g['peak_rss']:.2f} GiB | "
              f"step {s['step']:.1f} s (rollout {s['rollout']:.1f}, update {s['update']:.1f}) | "
              f"{r['tokens_per_s']:.0f} tokens/s", flush=True)
    full = REAL_SIZES[args.size].num_hidden_layers
    for dtype, rank in ((d, r) for d in args.dtype for r in args.lora_rank):
        got = sorted((r for r in rows if r["dtype"] == dtype and (r.get("lora_rank") or 0) == rank),
                     key=lambda r: r["layers"])
        if len(got) >= 2:
            xs = [r["layers"] for r in got]
            fits = {k: _fit(xs, [f(r) for r in got]) for k, f in (
                ("working GiB", lambda r: r["gib"]["working"]), ("states GiB", lambda r: r["gib"]["states"]),
                ("step s", lambda r: r["seconds"]["step"]))}
            # a slope below zero is noise between runs (working memory did not shrink with depth): no line for it
            print(f"{dtype}{f' LoRA r={rank}' if rank else ''}, extrapolated (not measured) to {full} layers from {xs}: " + ", ".join(
                f"{k} {a + b * full:.1f} ({b:+.2f} per layer)" if b >= 0 else f"{k}: no growth with depth measured"
                for k, (a, b) in fits.items()))
    if rows:
        print(rows[0]["machine"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
