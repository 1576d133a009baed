"""bench/trl_side_by_side.py on the tiny policy: pebr's arm and TRL's arm run one step on the same
folder, make the same number of response tokens and count the same model states; the memory
accounting (StepMemory) subtracts what the step adds. TRL is not in requirements.txt: its arm is
skipped where it is not installed (the bench's docstring says how to install it)."""
import random

import pytest
import torch

from bench import trl_side_by_side as sbs
from pebr.model.policy import build_tiny_policy


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_policy(seed=random.randrange(1000)).save(str(path))
    return str(path)


def test_step_memory_subtracts_the_states_the_step_adds():
    """The arithmetic on a scripted RSS (a real allocation may reuse pages the allocator already holds,
    so the real RSS need not grow: this failed once in CI after 1,500 earlier tests)."""
    rss = [1_000_000]
    mem = sbs.StepMemory()
    mem._stop = True  # no poller: only the calls below sample, in order
    mem._thread.join()
    mem._rss = lambda: rss[0]
    w = torch.nn.Parameter(torch.randn(257, 129))
    mem.start([w], adam_bytes=sbs._adam_bytes([w]))
    assert mem.adam == 2 * w.numel() * 4 and mem.before == 1_000_000
    (w * torch.randn_like(w)).sum().backward()
    (w * w).sum().backward()  # a second accumulation is not a second gradient
    assert mem.added == w.numel() * 4
    rss[0] = 1_000_000 + mem.added + 5_000  # the gradient is a state; 5,000 bytes above it are working
    mem.sample()
    mem.enter("optimizer")
    rss[0] = 1_000_000 + mem.added + mem.adam + 7_000  # AdamW's moments are states from here on
    mem.enter("after")
    mem.stop()
    assert set(mem.working) == {"prepare", "optimizer", "after"}
    assert mem.working["prepare"] == 5_000 and mem.working["optimizer"] == 7_000
    assert mem.peak_rss == rss[0]


@pytest.mark.parametrize("arm", ["pebr", "trl"])
def test_each_arm_runs_one_step_of_exactly_n_times_t_tokens(folder, arm):
    prompts, n, tokens = 1 + random.randrange(2), 2, 3 + random.randrange(4)
    if arm == "pebr":
        r = sbs.run_pebr(folder, prompts, n, tokens, "float32", 112, random.randrange(100))
    else:
        pytest.importorskip("trl")
        r = sbs.run_trl(folder, prompts, n, tokens, "float32", 112, random.randrange(100), liger=False)
    assert r["arm"] == arm and r["response_tokens"] == prompts * n * tokens
    g = r["gib"]
    weights = sum(p.numel() for p in build_tiny_policy().model.parameters()) * 4 / 2**30
    assert g["weights"] == pytest.approx(weights) and g["reference"] == pytest.approx(weights)
    assert g["gradients"] == pytest.approx(weights) and g["adamw"] == pytest.approx(2 * weights)
    assert {"prepare", "generate", "forward/backward", "optimizer"} <= set(g["working_by_phase"])
    assert g["working"] == max(g["working_by_phase"].values()) and r["tokens_per_s"] > 0
