"""engine.ops.group_advantages: every backend and the reference against an fp64 truth; edge cases, bad input.

The truth is this file's own fp64 evaluation of the contract (docs/ops.md#group_advantages), never
`engine.reference`; `assert_matches_fp64` bounds the backend's error and the reference's alike.
"""
import pytest
import torch

import engine
import engine.ops as ops
from engine import reference
from engine.grpo_options import ADVANTAGE_SCALES
from tests.tolerance import assert_matches_fp64

# Bound on adv (fp32 out): k * eps(fp32) * max(1, max |adv|). The cpp and cuda kernels work in double
# and round once (half an ulp). The reference and Triton work in fp32: the centred value r - mean
# carries a couple of roundings of the rewards' range (<= 2 here), the std (a sum of G <= 64 squares,
# then sqrt) a few relative ulps, so an entry of adv is off by about eps * (range / std + 2), at most
# ~6 eps for these rewards (std >= ~0.5); measured: <= 2.1 eps. k = 8. A wrong formula (a sign, a
# biased std, a missing shift) is off by a fraction of |adv|, about 1e5 times more.
K_ADV = 8


def _fp64(rewards, group_size, scale, eps):
    """The contract in fp64: (r - mean_g) / (std_g + eps), std unbiased, 0 for a group of one."""
    r = rewards.double().reshape(-1, group_size)
    c = r - r.mean(-1, keepdim=True)
    if scale == "none":
        return c.reshape(-1)
    if scale == "group":
        std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(r)
    else:
        std = rewards.double().std() if rewards.numel() > 1 else torch.zeros((), dtype=torch.float64)
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


def _check(backend, rewards, group_size, scale="group", eps=1e-6):
    out = _adv(backend, rewards, group_size, scale=scale, eps=eps)
    assert out.dtype == torch.float32 and out.shape == rewards.shape
    truth = _fp64(rewards, group_size, scale, eps)
    ref = reference.group_advantages(rewards, group_size, scale=scale, eps=eps)
    assert_matches_fp64("adv", out, truth, dtype=torch.float32, k=K_ADV, torch_out=ref)


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
@pytest.mark.parametrize("B,G", [(64, 8), (12, 3), (5, 5), (4, 1), (1, 1), (40, 2), (192, 64)])
def test_matches_fp64(backend_name, scale, B, G):
    _check(backend_name, torch.rand(B) * 2 - 0.5, G, scale)


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_binary_rewards(backend_name, scale):
    # the common case: 0/1 accuracy rewards, some groups all right or all wrong
    rewards = (torch.rand(48) > 0.5).float()
    rewards[:8] = 1.0
    rewards[8:16] = 0.0
    _check(backend_name, rewards, 8, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(backend_name, dtype):
    # the truth is taken from the rewards as given (fp64: before the kernels round them to fp32)
    _check(backend_name, (torch.rand(16) * 3).to(dtype), 4)


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
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


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_empty_batch(backend_name, scale):
    out = _adv(backend_name, torch.zeros(0), 4, scale=scale)
    assert out.shape == (0,) and out.dtype == torch.float32


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
        ((torch.rand(8), True), {}, "group_size"),
        ((torch.rand(2, 4), 4), {}, "rewards"),
        ((torch.arange(8), 4), {}, "rewards"),
        ((torch.rand(8), 4), {"scale": "global"}, "scale"),
        ((torch.rand(8), 4), {"eps": -1.0}, "eps"),
        ((torch.rand(8), 4), {"eps": float("inf")}, "eps"),
    ],
)
def test_bad_input(backend_name, args, kw, name):
    with pytest.raises(ValueError, match=name):
        _adv(backend_name, *args, **kw)


def test_kernel_checks_raise_value_error():
    """The C++ kernel checks its own arguments (a caller of torch.ops.engine skips the wrapper's)."""
    if "cpp" not in engine.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    fwd = torch.ops.engine.group_advantages_fwd
    with pytest.raises(ValueError, match="scale"):
        fwd(torch.rand(8), 4, "global", 1e-6)
    with pytest.raises(ValueError, match="group_size"):
        fwd(torch.rand(10), 4, "group", 1e-6)
    with pytest.raises(ValueError, match="rewards"):
        fwd(torch.rand(2, 4), 4, "group", 1e-6)
    with pytest.raises(ValueError, match="eps"):
        fwd(torch.rand(8), 4, "group", -1.0)


def test_opcheck_compile_deterministic(backend_name):
    if backend_name == "torch":
        pytest.skip("the torch backend is the plain reference, no custom op")
    from engine.group_advantages import _group_advantages_op

    rewards = torch.rand(24, device=DEVICE)
    for scale in ADVANTAGE_SCALES:
        torch.library.opcheck(_group_advantages_op, (rewards, 4, scale, 1e-6, backend_name))
    with engine.backend(backend_name):
        torch._dynamo.reset()
        compiled = torch.compile(lambda r: ops.group_advantages(r, 4, scale="batch") * 2, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(rewards), ops.group_advantages(rewards, 4, scale="batch") * 2)
        first = ops.group_advantages(rewards, 8)
        assert all(torch.equal(first, ops.group_advantages(rewards, 8)) for _ in range(4))


# ---- extreme values: one semantics for every backend (docs/ops.md#group_advantages, "Extreme values") ----


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_non_finite_reward_raises(backend_name, bad, scale):
    rewards = torch.rand(8)
    rewards[5] = bad
    with pytest.raises(ValueError, match="rewards must be finite.*entry 5"):
        _adv(backend_name, rewards, 4, scale=scale)


def test_fp64_reward_beyond_fp32_range_raises(backend_name):
    # the kernels work on the rewards rounded to fp32: 1e300 would become inf
    with pytest.raises(ValueError, match="rewards must be finite"):
        _adv(backend_name, torch.tensor([0.0, 1e300, 1.0, 2.0], dtype=torch.float64), 2)


def test_kernel_refuses_non_finite_reward():
    if "cpp" not in engine.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    with pytest.raises(ValueError, match="rewards must be finite"):
        torch.ops.engine.group_advantages_fwd(torch.tensor([1.0, float("nan")]), 2, "group", 1e-6)


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_equal_rewards_eps_zero_give_exactly_zero(backend_name, scale):
    # std + eps = 0: 0 / 0 is defined as 0 (the contract: a group of equal rewards gives exactly 0)
    rewards = torch.tensor([0.3] * 4 + [1.0, 0.0, 0.0, 1.0])
    out = _adv(backend_name, rewards, 4, scale=scale, eps=0.0)
    assert torch.equal(out[:4], torch.zeros(4)) and torch.isfinite(out).all()
    assert torch.equal(_adv(backend_name, torch.full((8,), 2.5), 4, scale=scale, eps=0.0), torch.zeros(8))
    assert torch.equal(reference.group_advantages(rewards, 4, scale=scale, eps=0.0)[:4], torch.zeros(4))


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_huge_rewards_do_not_overflow(backend_name, scale):
    # +-3e38: r - r0 and the squares overflow fp32; every backend works in fp64, so no NaN/inf
    rewards = torch.tensor([3e38, -3e38, -3e38, 3e38, 1e38, 3e38, 2e38, -1e38])
    out = _adv(backend_name, rewards, 4, scale=scale)
    assert torch.isfinite(out).all()
    _check(backend_name, rewards, 4, scale)
    if scale == "group":
        torch.testing.assert_close(out[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 * 3**0.5)
    two = _adv(backend_name, torch.tensor([3e38, -3e38]), 2, scale=scale)
    expect = {"group": 0.5**0.5, "batch": 0.5**0.5, "none": 3e38}[scale]
    torch.testing.assert_close(two, torch.tensor([expect, -expect]))
