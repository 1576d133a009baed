"""Checkpoints: atomic writes, the latest pointer, exact resume, and a run killed with SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pebr import train
from pebr.data.order import DataOrder
from pebr.model.policy import load_policy
from pebr.run.checkpoint import Checkpointer, load_trainer_state
from pebr.run.metrics_log import read_metrics

# A GRPO run small enough for seconds: 2 prompts x n=2, 12-token responses.
MICRO = ["-n", "2", "--rollout-batch", "2", "--micro-batch", "4", "--max-new-tokens", "12", "--sampling-items", "4",
         "--sampling-k", "2", "--split", "all", "--no-progress", "--lr", "1e-3"]


def test_data_order_is_reproducible():
    a = DataOrder(5, seed=3)
    first = a.take(7)
    b = DataOrder(5, seed=3, position=4)
    assert b.take(3) == first[4:7]
    assert sorted(first[:5]) == list(range(5))  # each epoch is a permutation
    with pytest.raises(ValueError):
        DataOrder(0, seed=0)


def test_save_latest_prune_and_sweep(tmp_path, tiny_folder):
    policy = load_policy(tiny_folder)
    ck = Checkpointer(tmp_path / "ck", keep=2)
    os.makedirs(tmp_path / "ck" / ".tmp-step_0000009-dead")  # a killed write's leftover
    for step in (1, 2, 3):
        ck.save(step, policy, {"step": step})
    assert ck.steps() == [2, 3]
    assert ck.latest().endswith("step_0000003") and load_trainer_state(ck.latest())["step"] == 3
    ck.sweep()
    assert not [n for n in os.listdir(ck.root) if n.startswith(".")]
    # a stale pointer (named checkpoint gone) falls back to the newest complete checkpoint
    with open(os.path.join(ck.root, "latest"), "w") as f:
        f.write("step_0000042\n")
    assert ck.latest().endswith("step_0000003")
    # the checkpoint folder is an ordinary transformers folder
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    Qwen2_5_VLForConditionalGeneration.from_pretrained(ck.latest())
    AutoTokenizer.from_pretrained(ck.latest())
    ck.clear()
    assert ck.latest() is None


def test_resume_continues_exactly(tmp_path, tiny_folder):
    """3 steps in one go == 2 steps, stop, --resume to 3: same rewards, losses and final weights."""
    common = ["--stage", "1", "--model", tiny_folder, "--save-every", "2", *MICRO]
    train.main([*common, "--output-dir", str(tmp_path / "a"), "--max-steps", "3"])
    train.main([*common, "--output-dir", str(tmp_path / "b"), "--max-steps", "2"])
    train.main([*common, "--output-dir", str(tmp_path / "b"), "--max-steps", "3", "--resume"])
    ma = read_metrics(str(tmp_path / "a" / "stage1" / "metrics.jsonl"))
    mb = read_metrics(str(tmp_path / "b" / "stage1" / "metrics.jsonl"))
    assert [m["step"] for m in mb] == [1, 2, 3]
    for x, y in zip(ma, mb):
        assert x["reward/overall"] == y["reward/overall"] and x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    wa = load_policy(tmp_path / "a" / "stage1" / "checkpoints" / "step_0000003").model.state_dict()
    wb = load_policy(tmp_path / "b" / "stage1" / "checkpoints" / "step_0000003").model.state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


def test_sigkill_then_resume(tmp_path, tiny_folder):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pebr.train", "--stage", "1", "--model", tiny_folder, "--output-dir", str(out),
           "--max-steps", "4", "--save-every", "1", *MICRO]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    latest = out / "stage1" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert latest.exists(), "no checkpoint appeared"
    time.sleep(0.3)  # land somewhere inside a later step or checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = Checkpointer(out / "stage1" / "checkpoints")
    killed_at = load_trainer_state(ck.latest())["step"]
    for s in ck.steps():  # every visible checkpoint loads
        load_policy(ck.path(s))
        load_trainer_state(ck.path(s))
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at step {killed_at}" in done.stderr
    assert f"taking over the lock left by a run that no longer holds it (pid {proc.pid} " in done.stderr
    steps = [m["step"] for m in read_metrics(str(out / "stage1" / "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]
    assert load_trainer_state(ck.latest())["step"] == 4
    assert not [n for n in os.listdir(ck.root) if n.startswith(".tmp-") or n.startswith(".trash-")]
    with open(out / "stage1" / "config.json") as f:
        assert json.load(f)["resume"] is True


def test_checkpoint_is_readable_by_others(tmp_path, tiny_folder):
    """Every file and folder of a checkpoint, and the `latest` pointer, readable by other users,
    even under a tight umask (mkdtemp/mkstemp make 0700/0600)."""
    import stat

    policy = load_policy(tiny_folder)
    old = os.umask(0o077)
    try:
        ck = Checkpointer(tmp_path / "ck")
        opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
        path = ck.save(1, policy, {"step": 1}, optimizer=opt, rng={"x": 1})
    finally:
        os.umask(old)
    seen = 0
    for dirpath, _, files in os.walk(path):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) & 0o755 == 0o755, dirpath
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, name)).st_mode) & 0o644 == 0o644, name
            seen += 1
    assert seen >= 5 and os.path.isdir(os.path.join(path, "optimizer"))
    assert stat.S_IMODE(os.stat(os.path.join(ck.root, "latest")).st_mode) & 0o644 == 0o644
    assert stat.S_IMODE(os.stat(ck.root).st_mode) & 0o755 == 0o755
