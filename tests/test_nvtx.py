"""Profiler ranges (engine/nvtx.py): one GRPO step of a tiny policy under the CPU PyTorch profiler
shows the ranges nsys shows on CUDA: rollout, generate, reference and policy forwards, backward,
optimizer step and every engine.ops call; without a profiler a range is nearly free; bench/profile.sh
--cpu leaves a Chrome trace with them."""
import dataclasses
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import engine.ops
from engine import nvtx

STEP_RANGES = ("rollout", "generate", "reference_forward", "policy_forward", "backward", "clip_grad_norm",
               "optimizer_step")


def _trace_names(prof, tmp_path) -> set[str]:
    """Event names of the profiler's Chrome trace (what a user opens in Perfetto)."""
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    return {e.get("name") for e in json.loads(path.read_text())["traceEvents"]}


def test_grpo_step_ranges_in_cpu_trace(tmp_path):
    from pebr.data.tasks import generate_items
    from pebr.model.policy import build_tiny_policy
    from pebr.recipe import config as C
    from pebr.run.distributed import World
    from pebr.trainers.grpo import GRPOTrainer

    cfg = dataclasses.replace(
        C.preset("tiny", stage=1), group_size=2, rollout_batch=2, mini_batch=2, micro_batch=4, max_new_tokens=6,
        max_steps=1, kl_coef=0.05, online_filter=False, progress=False, save_every=100, warmup_steps=0,
    )
    policy, reference = build_tiny_policy(seed=0), build_tiny_policy(seed=0)
    reference.model.eval().requires_grad_(False)
    torch.manual_seed(0)

    def reward(text, item, k):  # advantages that are not all 0, so the step updates
        return {"overall": float(len(text) % 3)}

    trainer = GRPOTrainer(cfg, policy=policy, reference=reference, items=generate_items(2, seed=1),
                          reward_fn=reward, run_dir=str(tmp_path), init_model=None, world=World())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        metrics = trainer.train_step()
    assert metrics.get("updates", 0) >= 1, metrics
    names = _trace_names(prof, tmp_path)
    missing = [r for r in STEP_RANGES if r not in names]
    assert not missing, f"ranges missing from the CPU trace: {missing}"
    # the ops the step calls (image encoding's patchify_embed, the head, advantages, loss)
    for op in ("group_advantages", "grpo_loss", "linear_token_logprobs"):
        assert f"engine.ops.{op}" in names, f"engine.ops.{op} not in the trace"


def test_every_op_is_ranged_and_keeps_its_signature(tmp_path):
    import inspect

    for name in engine.ops.__all__:
        fn = getattr(engine.ops, name)
        inner = getattr(fn, "__wrapped__", None)
        assert inner is not None and inner.__name__ == name, f"engine.ops.{name} is not wrapped in a range"
        assert inspect.signature(fn) == inspect.signature(inner)
        assert fn.__doc__ == inner.__doc__
    # and the range is there when called: a small op under the profiler
    r = torch.randn(8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine.ops.group_advantages(r, 4)
    assert "engine.ops.group_advantages" in _trace_names(prof, tmp_path)


def test_range_is_cheap_without_a_profiler_and_passes_errors():
    with nvtx.range("x"):
        pass
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        with nvtx.range("x"):
            pass
    per_call = (time.perf_counter() - t0) / n
    # a flag check and a generator: about 1 us here; record_function alone costs about 6 us.
    # 50 us is a bound a loaded 2-core CI machine keeps.
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} us a range without a profiler"
    try:
        with nvtx.range("x"):
            raise KeyError("inside")
    except KeyError as e:
        assert "inside" in str(e)
    else:
        raise AssertionError("the error inside a range was swallowed")


def test_profile_sh_cpu_leaves_a_trace_with_the_ranges(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, PROFILE_SCRATCH=str(tmp_path / "scratch"), OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", str(root / "bench" / "profile.sh"), "--cpu", str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["PROFILE.md", "trace.json.gz"]
    with gzip.open(out / "trace.json.gz", "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    missing = [r for r in STEP_RANGES + ("engine.ops.grpo_loss",) if r not in names]
    assert not missing, f"ranges missing from bench/profile.sh's trace: {missing}"
    report = (out / "PROFILE.md").read_text()
    assert "policy_forward" in report and "(exit 0)" in report  # the longest ops and ranges, listed
