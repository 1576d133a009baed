"""engine.ops.grpo_loss on extreme values: one semantics for every backend (docs/ops.md#grpo_loss,
"Extreme values"; split from tests/test_grpo_loss.py)."""
import itertools
import os
import subprocess
import sys

import pytest
import torch

import engine
import engine.ops as ops
from engine.grpo_options import KL_TYPES, LOSS_AGGS
from tests.tolerance import assert_matches_fp64
from tests.grpo_truth import *  # noqa: F401,F403
from tests.grpo_truth import _assert_bitwise, _check_all, _fp64, _inputs, _outputs, _run  # noqa: F401

# ---- extreme values: one semantics for every backend (docs/ops.md#grpo_loss, "Extreme values") ----


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["logp", "old_logp", "ref_logp", "advantages"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_masked_out_tokens_affect_nothing(backend_name, device, bad, where, loss_agg):
    """NaN/inf under mask 0 (in any input) changes no output and no gradient: the masked sums select,
    they do not multiply by the mask (0 * NaN = NaN)."""
    B, T = 3, 37
    logp, adv, mask, old, ref = _inputs(B, T, torch.float32, adv_per_token=True, has_old=True, has_ref=True,
                                        mask_kind="float", device=device)
    mask[0, 5] = 0.0
    mask[2, 30] = 0.0
    kw = dict(kl_coef=0.1, loss_agg=loss_agg)
    upstream = torch.tensor(1.3, device=device)
    clean = _run(backend_name, logp, adv, mask, upstream, old_logp=old, ref_logp=ref, **kw)
    inputs = dict(logp=logp.clone(), advantages=adv.clone(), old_logp=old.clone(), ref_logp=ref.clone())
    for b, t in ((0, 5), (2, 30)):
        inputs[where][b, t] = bad
    dirty = _run(backend_name, inputs["logp"], inputs["advantages"], mask, upstream,
                 old_logp=inputs["old_logp"], ref_logp=inputs["ref_logp"], **kw)
    assert torch.isfinite(dirty[0]) and all(torch.isfinite(v) for v in dirty[1].values())
    torch.testing.assert_close(dirty[0], clean[0])
    for k in METRICS:
        torch.testing.assert_close(dirty[1][k], clean[1][k], msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(dirty[2], clean[2])
    assert dirty[2][0, 5] == 0 and dirty[2][2, 30] == 0


def test_ppo_kl_nan_only_under_mask_zero(backend_name, device):
    """The probe's case: old_logp NaN only where the mask is 0 -> ppo_kl 0 (not NaN), every backend."""
    logp = torch.zeros(1, 2, device=device)
    old = torch.tensor([[0.0, float("nan")]], device=device)
    for mask in (torch.tensor([[1.0, 0.0]], device=device), torch.tensor([[True, False]], device=device)):
        with engine.backend(backend_name):
            loss, metrics = ops.grpo_loss(logp, torch.ones(1, device=device), mask, old_logp=old)
        assert float(metrics["ppo_kl"]) == 0.0 and torch.isfinite(loss)


@pytest.mark.parametrize("value", [float("nan"), -0.5, float("inf"), -1])
def test_bad_mask_values_raise(backend_name, device, value):
    """A non-bool mask holds weights: NaN, inf or negative ones are refused, naming mask."""
    dtype = torch.int64 if isinstance(value, int) else torch.float32
    mask = torch.ones(2, 3, dtype=dtype, device=device)
    mask[1, 2] = value
    with engine.backend(backend_name), pytest.raises(ValueError, match=r"mask must hold finite weights >= 0.*\[1, 2\]"):
        ops.grpo_loss(torch.randn(2, 3, device=device), torch.randn(2, device=device), mask)


@pytest.mark.parametrize("upstream", [0.0, 1.0])
def test_huge_advantage_gradient_stays_finite(backend_name, device, upstream):
    """A = 3e38 at a ratio of 1 (a tie of the two PPO terms): autograd splits the gradient as
    0.5*g1 + 0.5*g2; summing first (g1 + g2 = -6e38) overflowed to -inf in the kernels, and an
    upstream 0 then gave NaN. Expected: -A/T per token (token-mean over T = 2), times upstream."""
    x = torch.tensor([[-0.1, -0.2]], device=device, requires_grad=True)
    with engine.backend(backend_name):
        loss, _ = ops.grpo_loss(x, torch.tensor([3e38], device=device), torch.ones(1, 2, device=device))
    (loss * upstream).backward()
    assert float(loss) == -float("inf")  # -A summed over two tokens overflows fp32: documented
    expect = torch.full((1, 2), -1.5e38 * upstream)
    torch.testing.assert_close(x.grad.cpu(), expect, rtol=1e-6, atol=0)
