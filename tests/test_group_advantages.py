"""engine.ops.group_advantages: every backend against fp64 and the reference; edge cases, bad input."""
import pytest
import torch

import engine
import engine.ops as ops
from engine import reference
from tests.tolerance import assert_no_worse_than_torch


def _fp64(rewards, group_size, scale, eps):
    r = rewards.double().reshape(-1, group_size)
    c = r - r.mean(-1, keepdim=True)
    if scale == "none":
        return c.reshape(-1)
    if scale == "group":
        std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(r)
    else:
        std = rewards.double().std() if rewards.numel() > 1 else torch.zeros(())
    return (c / (std + eps)).reshape(-1)


DEVICE = None  # set per test by the autouse fixture below (tensors live on ENGINE_TEST_DEVICE)


@pytest.fixture(autouse=True)
def _on_device(device):
    global DEVICE
    DEVICE = device


def _adv(backend, rewards, group_size, **kw):
    """The backend's advantages for `rewards` moved to the test device, returned on the CPU."""
    with engine.backend(backend):
        return ops.group_advantages(rewards.to(DEVICE), group_size, **kw).cpu()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("B,G", [(64, 8), (12, 3), (5, 5), (4, 1), (1, 1), (40, 2)])
def test_matches_fp64(backend_name, scale, B, G):
    rewards = torch.rand(B) * 2 - 0.5
    out = _adv(backend_name, rewards, G, scale=scale)
    assert out.dtype == torch.float32 and out.shape == (B,)
    ref64 = _fp64(rewards, G, scale, 1e-6)
    assert_no_worse_than_torch("adv", out, reference.group_advantages(rewards, G, scale=scale), ref64, floor=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(backend_name, dtype):
    rewards = (torch.rand(16) * 3).to(dtype)
    out = _adv(backend_name, rewards, 4)
    assert out.dtype == torch.float32
    assert_no_worse_than_torch("adv", out, reference.group_advantages(rewards, 4), _fp64(rewards, 4, "group", 1e-6),
                               floor=1e-5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_exactly_zero(backend_name, scale):
    rewards = torch.tensor([0.1] * 8 + [0.7, 0.3, 0.3, 0.9] + [1 / 3] * 4)
    out = _adv(backend_name, rewards, 4, scale=scale)
    assert torch.equal(out[:8], torch.zeros(8)) and torch.equal(out[12:], torch.zeros(4))
    assert (out[8:12] != 0).all()
    assert torch.equal(_adv(backend_name, torch.full((6,), 0.3), 3, scale=scale), torch.zeros(6))  # whole batch flat


def test_binary_rewards_known_values(backend_name):
    # group [1, 0, 0, 1]: mean 0.5, unbiased std 1/sqrt(3)
    out = _adv(backend_name, torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, -1.0, 1.0]) * (0.5 * 3**0.5))


def test_empty_batch(backend_name):
    assert _adv(backend_name, torch.zeros(0), 4).shape == (0,)


def test_no_gradient(backend_name):
    rewards = torch.rand(8, requires_grad=True, device=DEVICE)
    with engine.backend(backend_name):
        assert not ops.group_advantages(rewards, 4).requires_grad


@pytest.mark.parametrize(
    "args,kw,name",
    [
        ((torch.rand(10), 4), {}, "group_size"),
        ((torch.rand(8), 0), {}, "group_size"),
        ((torch.rand(8), 2.0), {}, "group_size"),
        ((torch.rand(2, 4), 4), {}, "rewards"),
        ((torch.arange(8), 4), {}, "rewards"),
        ((torch.rand(8), 4), {"scale": "global"}, "scale"),
        ((torch.rand(8), 4), {"eps": -1.0}, "eps"),
    ],
)
def test_bad_input(backend_name, args, kw, name):
    with pytest.raises(ValueError, match=name):
        _adv(backend_name, *args, **kw)


def test_opcheck_compile_deterministic(backend_name):
    if backend_name == "torch":
        pytest.skip("the torch backend is the plain reference, no custom op")
    from engine.grpo import _group_advantages_op

    rewards = torch.rand(24, device=DEVICE)
    for scale in ("group", "batch", "none"):
        torch.library.opcheck(_group_advantages_op, (rewards, 4, scale, 1e-6, backend_name))
    with engine.backend(backend_name):
        torch._dynamo.reset()
        compiled = torch.compile(lambda r: ops.group_advantages(r, 4, scale="batch") * 2, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(rewards), ops.group_advantages(rewards, 4, scale="batch") * 2)
        first = ops.group_advantages(rewards, 8)
        assert all(torch.equal(first, ops.group_advantages(rewards, 8)) for _ in range(4))
