"""Every op on a grid of extreme inputs: every backend that runs here gives the same outcome.

The per-op files (tests/test_<op>.py, "extreme values" sections) pin each documented result to
its value (docs/ops.md, "Extreme inputs at a glance"). This file checks the other half of the
contract: on NaN, +-inf, +-3e38, empty and one-element inputs, the backends never disagree. The
outcome of a call is either the exception class it raised, or its outputs and input gradients;
two outcomes agree when both raised the same class, or when every tensor has the same shape,
NaN in the same places, the same infinities and close finite values. `torch` (the reference
backend) is the yardstick; each other backend is compared with it.

A case is `build(device) -> thunk`; the thunk calls the op (fresh leaf tensors each call, so a
backend's backward cannot leak into another's) and returns the tensors to compare.
"""
from __future__ import annotations

import math

import pytest
import torch

import engine
from engine import ops
from tests.conftest import BACKENDS_HERE, DEVICE

NAN, INF, BIG = float("nan"), float("inf"), 3e38


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(t.is_floating_point())


def _grads(outs: list[torch.Tensor], leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """outs + d(sum of outs' finite parts)/d(leaves): the backward runs on every path that has one."""
    diff = [o for o in outs if o.requires_grad]
    if not diff:
        return outs
    total = sum(torch.where(torch.isfinite(o), o, torch.zeros_like(o)).sum() for o in diff)
    grads = torch.autograd.grad(total, [x for x in leaves if x.requires_grad], allow_unused=True)
    return outs + [g if g is not None else torch.zeros(0) for g in grads]


# ---- cases: op -> {name: build(device) -> thunk} ------------------------------------------------


def _token_logprobs(rows: list[list[float]], ids: list[int], temperature: float = 1.0):
    def build(device):
        width = len(rows[0]) if rows else 7  # an empty batch keeps a vocabulary of 7
        logits = torch.tensor(rows, dtype=torch.float32, device=device).reshape(len(ids), width)
        idx = torch.tensor(ids, dtype=torch.long, device=device)

        def thunk():
            x = _leaf(logits)
            logp, ent = ops.token_logprobs(x, idx, temperature=temperature, return_entropy=True)
            return _grads([logp, ent], [x])

        return thunk

    return build


def _linear(hidden: torch.Tensor, weight: torch.Tensor, ids: list[int]):
    def build(device):
        h, w = hidden.to(device), weight.to(device)
        idx = torch.tensor(ids, dtype=torch.long, device=device)

        def thunk():
            hl, wl = _leaf(h), _leaf(w)
            logp, ent = ops.linear_token_logprobs(hl, wl, idx, return_entropy=True)
            return _grads([logp, ent], [hl, wl])

        return thunk

    return build


def _advantages(rewards: list[float], group_size: int, **kw):
    def build(device):
        r = torch.tensor(rewards, dtype=torch.float32, device=device)
        return lambda: [ops.group_advantages(r, group_size, **kw)]

    return build


def _grpo(logp, adv, mask, *, old=None, ref=None, **kw):
    def build(device):
        def as_t(v):
            return None if v is None else torch.tensor(v, dtype=torch.float32, device=device)

        lp, a, m, o, r = as_t(logp), as_t(adv), as_t(mask), as_t(old), as_t(ref)
        if lp.numel() == 0:  # an empty batch keeps T = 3
            lp, m = lp.reshape(0, 3), m.reshape(0, 3)

        def thunk():
            x = _leaf(lp)
            loss, metrics = ops.grpo_loss(x, a, m, old_logp=o, ref_logp=r, **kw)
            return _grads([loss] + [metrics[k] for k in sorted(metrics)], [x])

        return thunk

    return build


def _patch_embed(pixels: torch.Tensor, out_features: int = 5):
    def build(device):
        pv = pixels.to(device)
        # a Conv3d weight [E, C, Tp, P, P] with C*Tp*P*P = 8 (C 2, Tp 1, P 2): small, every layout rule holds
        w = torch.randn(out_features, 2, 1, 2, 2, device=device) * 0.1
        b = torch.randn(out_features, device=device)

        def thunk():
            x, wl = _leaf(pv), _leaf(w)
            return _grads([ops.patch_embed(x, wl, b)], [x, wl])

        return thunk

    return build


def _patchify(images: torch.Tensor, **kw):
    def build(device):
        im = images.to(device)
        return lambda: list(ops.patchify(im, **kw))

    return build


def _patchify_embed(images: torch.Tensor, out_features: int = 6, **kw):
    def build(device):
        im = images.to(device)
        w = torch.randn(out_features, 3, 2, 14, 14, device=device) * 0.01  # Qwen's Conv3d weight

        def thunk():
            wl = _leaf(w)
            out = ops.patchify_embed(im, wl, **kw)
            emb, thw = out if isinstance(out, tuple) else (out, None)
            return _grads([emb], [wl]) + ([thw] if thw is not None else [])

        return thunk

    return build


def _uint8_images(b: int, h: int = 28, w: int = 28) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8)


def _float_images(values) -> torch.Tensor:
    im = torch.rand(1, 3, 28, 28) * 255
    for (c, y, x), v in values:
        im[0, c, y, x] = v
    return im


# images both pixel ops get (each also has cases of its own below)
PIXEL_CASES = {
    "empty_batch": _uint8_images(0),
    "float_unit_range": torch.rand(1, 3, 28, 28),
    "float_with_nan": _float_images([((0, 3, 4), NAN)]),
    "float_huge": _float_images([((2, 5, 5), BIG)]),
}

CASES: dict[str, dict] = {
    "token_logprobs": {
        "nan_in_one_row": _token_logprobs([[1.0, NAN, 0.0], [0.5, 0.25, 2.0]], [0, 2]),
        "masked_minus_inf": _token_logprobs([[-INF, 1.0, -INF], [0.0, -INF, 3.0]], [1, 2]),
        "plus_inf_logit": _token_logprobs([[1.0, INF, 0.0]], [0]),
        "huge_finite": _token_logprobs([[BIG, BIG, 3.0], [BIG, -BIG, BIG]], [0, 1]),
        "tiny_temperature_overflow": _token_logprobs([[1.0, 2.0], [1e10, 2e10]], [0, 1], temperature=1e-30),
        "tiny_temperature_finite": _token_logprobs([[1.0, 2.0, 3.0]], [2], temperature=1e-30),
        "empty": _token_logprobs([[0.0] * 7][:0], []),
        "one_token_one_entry": _token_logprobs([[2.5]], [0]),
        "id_out_of_range": _token_logprobs([[1.0, 2.0]], [2]),
    },
    "linear_token_logprobs": {
        "nan_hidden_row": _linear(torch.tensor([[NAN, 1.0], [0.5, -1.0]]), torch.randn(5, 2), [0, 4]),
        "inf_hidden": _linear(torch.tensor([[INF, 1.0]]), torch.randn(5, 2), [1]),
        "huge_product": _linear(torch.tensor([[1e20, 1.0]]), torch.tensor([[1e20, 0.0], [1.0, 1.0], [-1e20, 0.0]]), [1]),
        "hidden_zero_width": _linear(torch.zeros(3, 0), torch.zeros(6, 0), [0, 5, 2]),
        "empty_tokens": _linear(torch.zeros(0, 4), torch.randn(6, 4), []),
        "one_token_one_row": _linear(torch.randn(1, 3), torch.randn(1, 3), [0]),
        "id_out_of_range": _linear(torch.randn(2, 3), torch.randn(4, 3), [0, 4]),
    },
    "group_advantages": {
        "nan_reward": _advantages([1.0, NAN, 0.0, 1.0], 2),
        "inf_reward": _advantages([1.0, INF, 0.0, 1.0], 2),
        "minus_inf_reward": _advantages([-INF, 1.0], 2),
        "huge_rewards": _advantages([BIG, -BIG, BIG, BIG], 2),
        "huge_rewards_batch": _advantages([BIG, -BIG, 1.0, 0.0], 2, scale="batch"),
        "flat_group_eps0": _advantages([0.5, 0.5, 1.0, 0.0], 2, eps=0.0),
        "flat_batch_eps0": _advantages([0.5, 0.5, 0.5, 0.5], 2, scale="batch", eps=0.0),
        "empty": _advantages([], 4),
        "one_element": _advantages([3.0], 1),
        "size_not_multiple": _advantages([1.0, 2.0, 3.0], 2),
    },
    "grpo_loss": {
        "nan_logp_under_mask0": _grpo([[0.0, NAN]], [1.0], [[1.0, 0.0]]),
        "nan_old_under_mask0": _grpo([[0.0, -0.5]], [1.0], [[1.0, 0.0]], old=[[0.0, NAN]]),
        "inf_ref_under_mask0": _grpo([[-0.1, -0.5]], [-1.0], [[0.0, 1.0]], ref=[[INF, -0.2]], kl_coef=0.1),
        "nan_mask": _grpo([[0.0, -0.5]], [1.0], [[1.0, NAN]]),
        "negative_mask": _grpo([[0.0, -0.5]], [1.0], [[1.0, -1.0]]),
        "huge_advantage": _grpo([[-0.1, -0.2]], [BIG], [[1.0, 1.0]]),
        "huge_log_ratio": _grpo([[0.0, -80.0]], [1.0, ], [[1.0, 1.0]], old=[[-80.0, 0.0]], ref=[[-80.0, 0.0]],
                                kl_coef=0.1, kl_type="low_var_kl"),
        "all_masked": _grpo([[-0.1, -0.2], [-0.3, -0.4]], [1.0, -1.0], [[0.0, 0.0], [0.0, 0.0]]),
        "empty_batch": _grpo([[0.0] * 3][:0], [], [[0.0] * 3][:0]),
        "one_token": _grpo([[-0.7]], [0.3], [[1.0]], old=[[-0.5]], ref=[[-0.9]], kl_coef=0.05),
    },
    "patch_embed": {
        "nan_pixel": _patch_embed(torch.tensor([[NAN] + [0.5] * 7, [0.1] * 8])),
        "inf_pixel": _patch_embed(torch.tensor([[INF] + [0.5] * 7])),
        "huge_pixels": _patch_embed(torch.full((2, 8), BIG)),
        "empty": _patch_embed(torch.zeros(0, 8)),
        "one_patch": _patch_embed(torch.randn(1, 8)),
    },
    "patchify": {
        "uint8_one_image": _patchify(_uint8_images(1)),
        **{name: _patchify(images) for name, images in PIXEL_CASES.items()},
        "float_with_inf": _patchify(_float_images([((1, 0, 0), INF)])),
        "too_small": _patchify(_uint8_images(1, 14, 28)),
    },
    "patchify_embed": {
        "uint8_two_images": _patchify_embed(_uint8_images(2)),
        **{name: _patchify_embed(images) for name, images in PIXEL_CASES.items()},
    },
}

GRID = [(op, name) for op, cases in CASES.items() for name in cases]


def _outcome(backend: str, build) -> tuple[str, object]:
    torch.manual_seed(1234)  # the same random weights for every backend
    thunk = build(DEVICE)
    try:
        with engine.backend(backend):
            tensors = thunk()
    except (ValueError, IndexError, RuntimeError, TypeError) as exc:
        return "raised", type(exc).__name__
    return "returned", [t.detach().to("cpu", torch.float64) for t in tensors]


def _same(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """None if a and b agree (shape, NaN places, infinities, close finite values), else why not."""
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return "NaN in different places"
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    if not torch.equal(inf_a, inf_b) or not torch.equal(a[inf_a], b[inf_b]):
        return "different infinities"
    fin = torch.isfinite(a)
    diff = (a[fin] - b[fin]).abs()
    bound = 1e-5 + 1e-4 * b[fin].abs()
    if diff.numel() and bool((diff > bound).any()):
        i = int((diff - bound).argmax())
        return f"finite values differ: {float(a[fin][i])!r} vs {float(b[fin][i])!r}"
    return None


OTHER_BACKENDS = [b for b in BACKENDS_HERE if b != "torch"]


@pytest.mark.skipif(not OTHER_BACKENDS, reason="only the torch backend runs here")
@pytest.mark.parametrize("op,case", GRID, ids=[f"{o}-{c}" for o, c in GRID])
def test_backends_agree_on_extreme_inputs(op, case):
    build = CASES[op][case]
    expect = _outcome("torch", build)
    for backend in OTHER_BACKENDS:
        got = _outcome(backend, build)
        assert got[0] == expect[0], f"{op}/{case}: torch {expect[0]} {_short(expect)}, {backend} {got[0]} {_short(got)}"
        if got[0] == "raised":
            assert got[1] == expect[1], f"{op}/{case}: torch raised {expect[1]}, {backend} raised {got[1]}"
            continue
        assert len(got[1]) == len(expect[1]), f"{op}/{case}: {backend} returned {len(got[1])} tensors, torch {len(expect[1])}"
        for i, (g, e) in enumerate(zip(got[1], expect[1])):
            why = _same(g, e)
            assert why is None, f"{op}/{case}, output {i}: {backend} vs torch: {why}\n{backend}: {g}\ntorch: {e}"


def _short(outcome) -> str:
    return outcome[1] if outcome[0] == "raised" else f"{len(outcome[1])} tensors"


def test_grid_covers_every_op_and_kind():
    """Every public op has cases, and the grid holds NaN, inf, huge, empty and one-element inputs."""
    assert set(CASES) == set(ops.__all__)
    names = " ".join(name for _, name in GRID)
    for kind in ("nan", "inf", "huge", "empty", "one"):
        assert kind in names, kind
    assert math.isinf(INF) and BIG < torch.finfo(torch.float32).max
