"""One GRPO step side by side: pebr, TRL's GRPOTrainer, and TRL with Liger's fused linear GRPO loss,
on the same model folder, prompts, images and response lengths, each in its own process.

    python -m bench.trl_side_by_side --layers 2 --vision-blocks 1 --prompts 4 -n 4 --tokens 64   # small
    python -m bench.trl_side_by_side --layers 2 --vision-blocks 2 --prompts 1 -n 8 --tokens 512  # issue 21's shape
    python -m bench.trl_side_by_side ... --arms pebr trl --json out.json

TRL is not a dependency of pebr. Install it beside the venv, torch untouched:

    pip install trl==1.16.0                                   # arm "trl": the TRL in the venv
    pip install --target /tmp/trl-1.12.0 trl==1.12.0 requests # arm "trl-liger" (--trl-liger-path)

Why two TRL versions: TRL 1.13 replaced Liger's GRPO loss by a vendored copy and 1.15 dropped it
(`use_liger_kernel=True` now only patches Liger's Triton layer kernels; every GRPO forward runs
TRL's own chunked LM head, the "memory-efficient loss" made the default). TRL 1.12.0 is the last
release whose `use_liger_kernel=True` runs `liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`
(the liger-kernel of the venv); its child process finds it first on PYTHONPATH. Liger's layer
kernels are Triton (GPU) and are not applied: the arm is TRL's trainer with Liger's loss.

What is the same on every arm: the folder (saved by transformers at Qwen2.5-VL-3B's or -7B's
widths, random init, our tokenizer padded to the vocabulary; built on first use), P built-in
prompts with one image each (448 x 448 by default: 256 image tokens), n responses per prompt of
exactly T tokens (EOS is never sampled: TRL's min_new_tokens, pebr's EOS among the never-sampled
ids; the log-probs are taken before either suppression), one optimizer step (fused AdamW, lr
1e-6) of a token-mean clipped loss (clip 0.2 / 0.3, KL to the reference weighted 0.01, reference
loaded from the same folder), every sequence of the step in one forward/backward, weights in
--dtype with no autocast. What differs is each trainer's own way: pebr runs each prompt and its
image once per group (shared prefix) and samples only ids its tokenizer decodes; TRL runs the
prompt and image once per response and samples from the whole head.

Memory: the process's RSS sampled every 20 ms (StepMemory). "states" are counted from the
tensors: policy weights, gradients (one per trainable weight), AdamW's moments, the reference's
weights; every weight is read once before the step (the folder's safetensors are mapped, and a
page not yet read is not in the RSS). "working" is the largest, over the step, of the RSS minus
the RSS before the step minus the states the step has added by then (a gradient from its first
accumulation, AdamW's moments from the optimizer step): what sampling, the reference pass,
activations, the loss and the optimizer's temporaries take above the model states, reported per
phase too. "tokens/s" is the P * n * T response tokens over the step's wall time (rollout,
reference, loss, backward, optimizer step).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import time

ARMS = ("pebr", "trl", "trl-liger")
# The targets (issue 21): pebr's working memory <= 0.25 x TRL's and <= TRL + Liger's; tokens/s >= 2 x TRL's.
TARGET_WORKING_VS_TRL, TARGET_SPEED_VS_TRL = 0.25, 2.0


def default_folder(size: str, layers: int, blocks: int) -> str:
    return os.path.join("/tmp", f"pebr-{size}-L{layers}-B{blocks}")


def ensure_folder(folder: str, size: str, layers: int, blocks: int, seed: int) -> str:
    """A transformers folder at `size`'s widths, cut to `layers` / `blocks`, fp32 (built and saved once;
    every arm loads it in --dtype)."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    from pebr.model.sizes import build_sized_policy

    build_sized_policy(size, text_layers=layers, vision_blocks=blocks, seed=seed).save(folder)
    return folder


def _prompts(count: int, seed: int, image_size: int):
    from pebr.data.tasks import generate_items

    return generate_items(count, seed=seed, image_size=image_size)


def _reward():
    """A random reward in [0, 1): every group carries a signal, and neither trainer reads the text."""
    rng = random.Random(0)
    return lambda: rng.random()


def _states(weights, trainable, adam, reference) -> dict:
    return {"weights": weights, "gradients": trainable, "adamw": adam, "reference": reference,
            "states": weights + trainable + adam + reference}


class StepMemory:
    """Working memory through the step: a thread samples the RSS every 20 ms and keeps, per phase,
    the largest RSS minus the RSS before the step minus the states the step has added by then
    (each gradient from its first accumulation, counted by a hook; AdamW's moments from the
    optimizer step on). Phases: "prepare" (up to sampling: the trainer's set-up, prompts and images
    to tensors), "generate" (sampling), "forward/backward" (what follows up to the optimizer:
    scoring, the reference pass, the loss, the backward), "optimizer", "after"."""

    def __init__(self):
        import threading

        from bench.real_shapes import _rss_bytes

        self._rss, self.phase, self.before, self.added, self.adam = _rss_bytes, None, 0, 0, 0
        self.working, self.peak_rss, self._stop, self._seen = {}, 0, False, set()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop:
            self.sample()
            time.sleep(0.02)

    def sample(self):
        if self.phase is None:
            return
        rss = self._rss()
        self.peak_rss = max(self.peak_rss, rss)
        extra = self.added + (self.adam if self.phase in ("optimizer", "after") else 0)
        self.working[self.phase] = max(self.working.get(self.phase, -2**62), rss - self.before - extra)

    def start(self, params, adam_bytes: int):
        """Begin the step: `params` the trained weights (a hook counts each one's gradient once),
        `adam_bytes` what AdamW's moments will take (allocated at the first optimizer step)."""
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad)
        self.adam = adam_bytes
        self.before = self._rss()
        self.enter("prepare")

    def _grad(self, p):
        if id(p) not in self._seen:
            self._seen.add(id(p))
            self.added += p.numel() * p.element_size()

    def enter(self, phase):
        self.sample()
        self.phase = phase
        self.sample()

    def wrap(self, obj, name, phase, then):
        """obj.name runs in `phase`; `then` begins when it returns."""
        fn = getattr(obj, name)

        def wrapped(*a, **k):
            self.enter(phase)
            try:
                return fn(*a, **k)
            finally:
                self.enter(then)

        setattr(obj, name, wrapped)

    def stop(self):
        self.sample()
        self._stop = True
        self._thread.join()


def _adam_bytes(params) -> int:
    """AdamW's two moments, in the weights' dtype (torch's AdamW keeps them so)."""
    return sum(2 * p.numel() * p.element_size() for p in params if p.requires_grad)


def _make_resident(*modules) -> None:
    """Read every weight once: from_pretrained maps the folder's safetensors and a page counts in the RSS
    only once read, so without this the states would first appear inside the step and count as working."""
    import torch

    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                t.sum()


def _figures(arm, states, mem: StepMemory, wall, tokens, extra) -> dict:
    g = {k: v / 2**30 for k, v in states.items()}
    g.update(peak_rss=mem.peak_rss / 2**30, rss_before_step=mem.before / 2**30,
             working=max(mem.working.values()) / 2**30,
             working_by_phase={k: v / 2**30 for k, v in mem.working.items()})
    return {"arm": arm, "gib": g, "step_s": wall, "response_tokens": tokens, "tokens_per_s": tokens / wall, **extra}


def run_pebr(folder, prompts, n, tokens, dtype, image_size, seed) -> dict:
    """One step of pebr's GRPOTrainer (the paper preset's loss) on `folder`, in this process."""
    import torch

    from bench.real_shapes import _tensor_bytes
    from pebr.model.policy import Policy, load_policy
    from pebr.recipe import config as C
    from pebr.run.distributed import World
    from pebr.trainers.grpo import GRPOTrainer

    @dataclasses.dataclass
    class FixedLength(Policy):
        """Never samples EOS, so every response has exactly max_new_tokens tokens as TRL's min_new_tokens
        gives (the rollout records log-probs before suppressing, so the loss sees the policy's own)."""

        @property
        def never_sampled_ids(self) -> list[int]:
            return sorted(set(super().never_sampled_ids) | set(self.eos_ids))

    mem = StepMemory()
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    loaded = load_policy(folder, dtype=torch_dtype)
    policy = FixedLength(model=loaded.model, tokenizer=loaded.tokenizer, images=loaded.images)
    reference = load_policy(folder, dtype=torch_dtype)
    reference.model.eval().requires_grad_(False)
    items = _prompts(prompts, seed, image_size)
    cfg = dataclasses.replace(C.preset("paper", 2), dtype=dtype, group_size=n, rollout_batch=prompts,
                              mini_batch=prompts, micro_batch=prompts * n, max_new_tokens=tokens, temperature=1.0,
                              top_p=1.0, lr=1e-6, progress=False, max_steps=1)
    draw = _reward()
    trainer = GRPOTrainer(cfg, policy=policy, reference=reference, items=items,
                          reward_fn=lambda text, it, k: {"overall": draw()}, run_dir="/tmp/bench_trl_sbs_pebr",
                          init_model=None, world=World(), log=lambda m: None)
    _make_resident(policy.model, reference.model)
    params = list(policy.model.parameters())
    mem.wrap(trainer, "rollout", "generate", "forward/backward")
    trainer.opt.register_step_pre_hook(lambda *a: mem.enter("optimizer"))
    trainer.opt.register_step_post_hook(lambda *a: mem.enter("after"))
    mem.start([p for p in params if p.requires_grad], _adam_bytes(params))
    t0 = time.perf_counter()
    m = trainer.train_step()
    wall = time.perf_counter() - t0
    mem.stop()
    states = _states(_tensor_bytes(params), _tensor_bytes(p for p in params if p.requires_grad),
                     _tensor_bytes(t for s in trainer.opt.state.values() for t in s.values()
                                   if torch.is_tensor(t) and t.dim() > 0),
                     _tensor_bytes(reference.model.parameters()))
    made = round(prompts * n * m["response_length"])
    return _figures("pebr", states, mem, wall, made, {
        "phases_s": {"rollout": m["rollout_s"], "update": m.get("update_s", float("nan"))},
        "loss": m["loss"], "kl": m["kl"], "params": sum(p.numel() for p in params)})


def _processor(folder):
    """Qwen2.5-VL's processor without torchvision: transformers' AutoProcessor always builds the video
    processor, which imports torchvision; TRL needs only images, so the Pillow image processor
    (Qwen2VLImageProcessorPil, the pixels pebr's ImageEncoder makes) and no video processor."""
    from transformers import AutoImageProcessor, Qwen2_5_VLProcessor

    from pebr.model.policy import load_tokenizer

    class ImagesOnly(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    tok = load_tokenizer(folder)
    images = AutoImageProcessor.from_pretrained(folder, backend="pil", local_files_only=True)
    return ImagesOnly(image_processor=images, tokenizer=tok, video_processor=None, chat_template=tok.chat_template)


def run_trl(folder, prompts, n, tokens, dtype, image_size, seed, liger: bool) -> dict:
    """One step of TRL's GRPOTrainer on `folder` (Liger's loss when `liger`), in this process."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from bench.real_shapes import _tensor_bytes
    from pebr.data.prompts import build_prompt

    mem = StepMemory()
    proc = _processor(folder)
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": build_prompt(it.problem)}]}],
             "image": it.image} for it in _prompts(prompts, seed, image_size)]
    draw = _reward()
    args = trl.GRPOConfig(
        output_dir="/tmp/bench_trl_sbs_trl", per_device_train_batch_size=prompts * n, num_generations=n,
        gradient_accumulation_steps=1, max_completion_length=tokens, max_steps=1, learning_rate=1e-6,
        beta=0.01, epsilon=0.2, epsilon_high=0.3, loss_type="dapo", temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": tokens}, model_init_kwargs={"dtype": dtype}, use_cpu=True,
        bf16=False, report_to="none", save_strategy="no", logging_steps=1, seed=seed, dataloader_num_workers=0,
        use_liger_kernel=liger, disable_tqdm=True)
    trainer = trl.GRPOTrainer(model=folder, reward_funcs=lambda completions, **kw: [draw() for _ in completions],
                              args=args, train_dataset=Dataset.from_list(rows), processing_class=proc)
    if liger:
        if type(getattr(trainer, "liger_loss", None)).__name__ != "LigerFusedLinearGRPOLoss":
            raise RuntimeError(f"TRL {trl.__version__} does not run Liger's GRPO loss with use_liger_kernel=True "
                               f"(see this module's docstring: TRL 1.12.0 is the last that does)")
        # transformers' Trainer would now patch Liger's Triton layer kernels into the model (GPU only);
        # TRL's loss choice was made in __init__ and stays
        trainer.args.use_liger_kernel = False

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            mem.enter("optimizer")

        def on_optimizer_step(self, args, state, control, **kw):
            mem.enter("after")

        def on_step_end(self, args, state, control, **kw):
            self.wall = time.perf_counter() - self.t0

    clock = Clock()
    trainer.add_callback(clock)
    model, ref = trainer.model, trainer.ref_model
    _make_resident(*(m for m in (model, ref) if m is not None))
    params = list(model.parameters())
    mem.wrap(trainer, "_generate", "generate", "forward/backward")
    mem.start([p for p in params if p.requires_grad], _adam_bytes(params))
    trainer.train()
    mem.stop()
    states = _states(_tensor_bytes(params), _tensor_bytes(p for p in params if p.requires_grad),
                     _tensor_bytes(t for s in trainer.optimizer.state.values() for t in s.values()
                                   if torch.is_tensor(t) and t.dim() > 0),
                     _tensor_bytes(ref.parameters()) if ref is not None else 0)
    log = trainer.state.log_history[0]
    made = round(prompts * n * log["completions/mean_length"])
    return _figures("trl-liger" if liger else "trl", states, mem, clock.wall, made, {
        "trl_version": trl.__version__, "loss": log.get("loss"), "kl": log.get("kl"),
        "trl_step_time_s": log.get("step_time"), "params": sum(p.numel() for p in params)})


def _table(rows, machine) -> str:
    by = {r["arm"]: r for r in rows}
    trl, liger = by.get("trl"), by.get("trl-liger")
    head = ("| arm | states GiB | working GiB | peak RSS GiB | working / TRL's | step s | tokens/s | tokens/s / TRL's |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        g = r["gib"]
        w = f"{g['working'] / trl['gib']['working']:.2f}" if trl and trl["gib"]["working"] > 0 else "-"
        s = f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}" if trl else "-"
        name = r["arm"] + (f" (TRL {r['trl_version']})" if "trl_version" in r else "")
        lines.append(f"| {name} | {g['states']:.2f} | {g['working']:.2f} | {g['peak_rss']:.2f} | {w} | "
                     f"{r['step_s']:.1f} | {r['tokens_per_s']:.2f} | {s} |")
    ours = by.get("pebr")
    if ours and trl:
        w = ours["gib"]["working"]
        checks = [f"working <= {TARGET_WORKING_VS_TRL} x TRL's: {w <= TARGET_WORKING_VS_TRL * trl['gib']['working']}",
                  f"tokens/s >= {TARGET_SPEED_VS_TRL} x TRL's: "
                  f"{ours['tokens_per_s'] >= TARGET_SPEED_VS_TRL * trl['tokens_per_s']}"]
        if liger:
            checks.insert(1, f"working <= TRL + Liger's: {w <= liger['gib']['working']}")
        lines.append("targets (issue 21): " + "; ".join(checks))
    lines.append(machine)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trl_side_by_side", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="qwen2.5-vl-3b", choices=("qwen2.5-vl-3b", "qwen2.5-vl-7b"))
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default: 2)")
    p.add_argument("--vision-blocks", type=int, default=2, help="vision blocks (default: 2)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--prompts", type=int, default=1, help="prompts in the step, one image each (default: 1)")
    p.add_argument("-n", type=int, default=8, help="responses per prompt (default: 8)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per response, exactly (default: 512)")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folder", default=None, help="the model folder (default: /tmp/pebr-SIZE-L..-B.., built if absent)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--trl-liger-path", default="/tmp/trl-1.12.0",
                   help="a folder holding TRL 1.12.0 (pip install --target DIR trl==1.12.0 requests), for trl-liger")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--one", default=None, choices=ARMS, help=argparse.SUPPRESS)  # the child process's arm
    args = p.parse_args(argv)
    folder = args.folder or default_folder(args.size, args.layers, args.vision_blocks)
    common = (folder, args.prompts, args.n, args.tokens, args.dtype, args.image_size, args.seed)
    if args.one:
        r = run_pebr(*common) if args.one == "pebr" else run_trl(*common, liger=args.one == "trl-liger")
        print(json.dumps(r))
        return 0
    ensure_folder(folder, args.size, args.layers, args.vision_blocks, args.seed)
    from pebr.run.machine import describe

    rows = []
    for arm in args.arms:
        env = dict(os.environ)
        if arm == "trl-liger":
            env["PYTHONPATH"] = os.pathsep.join(x for x in (args.trl_liger_path, env.get("PYTHONPATH")) if x)
        cmd = [sys.executable, "-m", "bench.trl_side_by_side", "--one", arm, "--folder", folder, "--dtype", args.dtype,
               "--prompts", str(args.prompts), "-n", str(args.n), "--tokens", str(args.tokens),
               "--image-size", str(args.image_size), "--seed", str(args.seed)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"{arm}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        g = r["gib"]
        print(f"{arm}: states {g['states']:.2f} GiB (weights {g['weights']:.2f}, grads {g['gradients']:.2f}, "
              f"AdamW {g['adamw']:.2f}, reference {g['reference']:.2f}) | working {g['working']:.2f} GiB ("
              + ", ".join(f"{k} {v:.2f}" for k, v in g["working_by_phase"].items()) + ") | peak RSS "
              f"{g['peak_rss']:.2f} GiB | step {r['step_s']:.1f} s | {r['response_tokens']} response tokens, "
              f"{r['tokens_per_s']:.2f} tokens/s", flush=True)
    print(f"{args.size}, {args.layers} decoder layers, {args.vision_blocks} vision blocks, {args.dtype}, "
          f"{args.prompts} prompt(s) x n={args.n} x {args.tokens} tokens, {args.image_size}x{args.image_size} images")
    print(_table(rows, describe("cpu")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
