"""group_advantages, each backend against the torch reference in the same run.

Bytes the op must move: read rewards [B] once, write adv [B] fp32 once (8 bytes per response). B is
prompts x n (a stage-1 rollout batch is 560 x 8 = 4480), so the op is tiny and mostly launch cost;
the benchmark is there to keep it that way next to grpo_loss.
Run: pytest bench/test_bench_group_advantages.py --benchmark-only
"""
import pytest
import torch

import engine
import engine.ops as ops
from bench.common import on_device, timed

GROUP = 8
SHAPES = [560 * GROUP, 65536]


def _rewards(B, device):
    g = on_device(device)
    return (torch.rand(B, generator=g, device=device) > 0.5).float()  # accuracy-style 0/1 rewards


@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("B", SHAPES, ids=lambda b: f"B={b}")
def test_group_advantages(benchmark, record, bench_backend, device, B, scale):
    rewards = _rewards(B, device)

    def fwd():
        return ops.group_advantages(rewards, GROUP, scale=scale)

    with engine.backend(bench_backend):
        timed(benchmark, fwd, device, rounds=100)
    record(benchmark, group=f"group_advantages B={B} group_size={GROUP} scale={scale}", backend=bench_backend,
           bytes=rewards.numel() * rewards.element_size() + B * 4)
