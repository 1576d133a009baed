"""Data parallelism (torchrun, FSDP2, gloo on 2 CPU ranks) against the world of one.

- the same fixed rollouts through a 1-process and a 2-process update: the same loss, gradient and
  weights after the optimizer step (fp32, tight tolerance);
- gradient accumulation is invisible: the micro-batch size changes nothing for every loss_agg;
- `torchrun -m pebr.train --stage 2` ends, writes its metrics, and its checkpoints load in
  transformers, resume after SIGKILL, and resume across world sizes (2 -> 1 -> 2);
- `torchrun -m pebr.eval` merges the ranks' records into the 1-rank result.
"""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pebr.recipe import config as C
from pebr.run.distributed import World
from pebr.trainers.grpo import GRPOTrainer
from pebr.model.policy import build_tiny_policy
from pebr.rollout.hf_engine import generate_rollouts
from pebr.data.tasks import generate_items

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist", "update_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# a collective that waits for a rank which never comes fails the job after 2 minutes, not 10
ENV = dict(os.environ, OMP_NUM_THREADS="1", PEBR_DIST_TIMEOUT_S="120",
           PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
# A stage-2 run small enough for seconds: 4 prompts x n=2 per step, 16-token responses.
SMALL = ["--no-progress", "--sampling-items", "8", "--sampling-k", "2", "--split", "all", "-n", "2",
         "--rollout-batch", "4", "--max-new-tokens", "16", "--save-every", "2"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _run(cmd, cwd, timeout=400):
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


@pytest.mark.parametrize("loss_agg,filtered,lora", [("token-mean", False, False), ("seq-mean-token-sum-norm", False, False),
                                                    ("token-mean", True, False), ("token-mean", False, True)])
def test_two_rank_update_equals_one_rank(tmp_path, monkeypatch, loss_agg, filtered, lora):
    """filtered: online filtering left rank 1 no group (it runs zero-weight passes to keep the
    collectives in step); the job must equal one rank training on rank 0's groups. lora: LoRA
    adapters (frozen base sharded, adapters trained and reduced), the reference the base itself."""
    if filtered:
        monkeypatch.setitem(ENV, "FILTERED", "1")
    if lora:
        pytest.importorskip("peft")
        monkeypatch.setitem(ENV, "LORA", "1")
    _run([sys.executable, WORKER, str(tmp_path / "one.pt"), loss_agg], tmp_path)
    _run(TORCHRUN + [WORKER, str(tmp_path / "two.pt"), loss_agg], tmp_path)
    one, two = (torch.load(tmp_path / f, weights_only=False) for f in ("one.pt", "two.pt"))
    assert one["world_size"] == 1 and two["world_size"] == 2
    for k in ("loss", "kl", "entropy", "grad_norm", "rollout_logp_diff"):
        a, b = one["metrics"][k], two["metrics"][k]
        assert abs(a - b) <= 1e-6 * max(1.0, abs(a)), f"{k}: 1 rank {a} vs 2 ranks {b}"
    assert one["grads"].keys() == two["grads"].keys() and one["grads"]
    assert all(".lora_" in k for k in one["grads"]) == lora  # with LoRA only the adapters have gradients
    gmax = max(float(g.abs().max()) for g in one["grads"].values())
    for name, g in one["grads"].items():
        # fp32 sums in another order (the all-reduce): a few ulps of the largest gradient
        err = float((g - two["grads"][name]).abs().max())
        assert err <= 1e-5 * gmax, f"gradient of {name}: {err:.2e} (largest gradient {gmax:.2e})"
    lr, eps = 1e-3, 1e-8  # the worker's AdamW (tests/dist/update_worker.py), one step, bias-corrected
    for name, w in one["weights"].items():
        err = (w - two["weights"][name]).abs()
        if name not in one["grads"]:  # no gradient (or a tied name): the same weight to 1% of lr
            assert float(err.max()) <= 1e-5, f"weight {name} after the step: {float(err.max()):.2e}"
            continue
        # AdamW's first step moves a weight by lr * g / (|g| + eps): about lr * sign(g), but where
        # |g| is near eps a gradient difference of a few ulps of the largest gradient (allowed above)
        # moves it by up to lr. The weights may differ by what the two runs' recorded gradients
        # explain, plus rounding; 1% of lr flat failed on such an element (1.1e-5).
        g1, g2 = one["grads"][name].double(), two["grads"][name].double()
        explained = lr * (g1 / (g1.abs() + eps) - g2 / (g2.abs() + eps)).abs()
        excess = float((err.double() - explained).max())
        assert excess <= 1e-6, f"weight {name} after the step: {excess:.2e} beyond what the gradients explain"


def _update_once(tmp_path, cfg, ro, adv, items, name):
    """One GRPOTrainer.update of fixed rollouts -> (metrics, gradients before the AdamW step)."""
    policy, reference = build_tiny_policy(seed=0), build_tiny_policy(seed=1)
    reference.model.eval().requires_grad_(False)
    trainer = GRPOTrainer(cfg, policy=policy, reference=reference, items=items, reward_fn=None,
                          run_dir=str(tmp_path / name), init_model=None, world=World())
    grads = {}
    trainer.opt.step = lambda *a, **k: grads.update(
        {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None})
    return trainer.update(ro, adv), grads


def _fixed_rollouts(cfg):
    items = generate_items(4, seed=5)
    torch.manual_seed(0)
    ro = generate_rollouts(build_tiny_policy(seed=0), items, n=2, temperature=1.0, max_new_tokens=12)
    # A random-init policy rarely ends a response: cut them to different lengths, as an end-of-turn
    # token would, so that micro-batches of different groups have different widths.
    L = ro.prompt_len
    for row, k in enumerate([12, 3, 7, 12, 5, 9, 2, 11]):
        ro.response_mask[row, k:] = 0
        ro.attention_mask[row, L + k:] = 0
        ro.num_tokens[row] = k
    return items, ro, torch.randn(8)


def _same_update(a, b):
    (ma, ga), (mb, gb) = a, b
    assert abs(ma["loss"] - mb["loss"]) <= 1e-6 * max(1.0, abs(mb["loss"])), (ma["loss"], mb["loss"])
    gmax = max(float(g.abs().max()) for g in gb.values())
    assert ga.keys() == gb.keys()
    for name in gb:
        assert float((ga[name] - gb[name]).abs().max()) <= 1e-5 * gmax, name


BASE = dict(group_size=2, rollout_batch=4, mini_batch=4, max_new_tokens=12, kl_coef=0.05, lr=1e-3, progress=False)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batch_size_changes_nothing(tmp_path, loss_agg):
    """Same rollouts, micro-batches of 2 vs 8 sequences: same logged loss and same gradient."""
    cfg = dataclasses.replace(C.preset("tiny", stage=2), loss_agg=loss_agg, **BASE)
    items, ro, adv = _fixed_rollouts(cfg)
    _same_update(*(_update_once(tmp_path, dataclasses.replace(cfg, micro_batch=m), ro, adv, items, str(m)) for m in (2, 8)))


def test_gradient_checkpointing_changes_nothing(tmp_path):
    """--gradient-checkpointing recomputes decoder layers and vision blocks: same loss and gradient."""
    cfg = dataclasses.replace(C.preset("tiny", stage=2), micro_batch=4, freeze_vision=False, **BASE)
    items, ro, adv = _fixed_rollouts(cfg)
    _same_update(*(_update_once(tmp_path, dataclasses.replace(cfg, gradient_checkpointing=gc), ro, adv, items, str(gc))
                   for gc in (False, True)))


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_run")
    _run([sys.executable, "-m", "pebr.train", "--stage", "0", "--max-steps", "2", "--sft-items", "16",
          "--output-dir", str(out), "--no-progress"], out)
    with open(out / "stage0" / "checkpoints" / "latest") as f:
        return out, str(out / "stage0" / "checkpoints" / f.read().strip())


def _metrics(out):
    with open(out / "stage2" / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_torchrun_stage2_then_resume_across_world_sizes(stage0, tmp_path):
    out, model = stage0
    out = tmp_path / "run"
    args = ["-m", "pebr.train", "--stage", "2", "--model", model, "--output-dir", str(out)] + SMALL
    _run(TORCHRUN + args + ["--max-steps", "4"], tmp_path)
    m = _metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4] and all(r["world_size"] == 2 for r in m)
    assert all(r["rollout_logp_diff"] < 0.05 for r in m), [r["rollout_logp_diff"] for r in m]
    ckpt = out / "stage2" / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in (ckpt / "optimizer").iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    from transformers import Qwen2_5_VLForConditionalGeneration

    Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)  # rank 0's full state dict is a plain HF folder

    _run([sys.executable] + args + ["--max-steps", "6", "--resume"], tmp_path)  # 2 ranks -> 1
    _run(TORCHRUN + args + ["--max-steps", "8", "--resume"], tmp_path)  # 1 rank -> 2
    m = _metrics(out)
    assert [r["step"] for r in m] == list(range(1, 9))
    assert [r["world_size"] for r in m] == [2, 2, 2, 2, 1, 1, 2, 2]
    assert [r["data_position"] for r in m] == [4 * s for s in range(1, 9)]  # the one global data order


def _kill_tree(pid: int) -> None:
    """SIGKILL pid and every process below it (read from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_torchrun_sigkill_then_resume(stage0, tmp_path):
    _, model = stage0
    out = tmp_path / "run"
    args = ["-m", "pebr.train", "--stage", "2", "--model", model, "--output-dir", str(out), "--max-steps", "40"] + SMALL
    proc = subprocess.Popen(TORCHRUN + args, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = out / "stage2" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts / "step_0000004").is_dir():
        time.sleep(0.2)
    _kill_tree(proc.pid)  # torchrun and both ranks (torchrun starts them in sessions of their own), mid-run
    proc.wait()
    assert (ckpts / "step_0000004").is_dir(), "no checkpoint appeared before the deadline"
    with open(ckpts / "latest") as f:
        step = int(f.read().strip().split("_")[1])
    _run(TORCHRUN + args + ["--resume", "--max-steps", str(step + 2)], tmp_path)  # the last --max-steps wins
    m = _metrics(out)
    assert [r["step"] for r in m] == list(range(1, step + 3)), [r["step"] for r in m]
    shutil.rmtree(out, ignore_errors=True)


def test_torchrun_eval_merges_ranks(stage0, tmp_path):
    _, model = stage0
    args = ["-m", "pebr.eval", "--model", model, "--num-items", "6", "--max-new-tokens", "8"]
    one = _run([sys.executable] + args + ["--output", str(tmp_path / "one.jsonl")], tmp_path)
    _run(TORCHRUN + args + ["--output", str(tmp_path / "two.jsonl")], tmp_path)
    read = lambda f: [json.loads(line) for line in open(tmp_path / f)]  # noqa: E731
    a, b = read("one.jsonl"), read("two.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 6
    assert [r["response"] for r in a] == [r["response"] for r in b]  # greedy: the same answers wherever they ran
    assert "accuracy" in one.stdout
