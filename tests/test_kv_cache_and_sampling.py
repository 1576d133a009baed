"""The rollout's decode loop: pebr.rollout.kv_cache.PreallocatedLayer (keys/values written in place, not
grown by torch.cat) holds exactly what transformers' DynamicLayer holds through any sequence of
updates, crops and batch changes, and generates the same tokens; the Gumbel-max draw of
pebr.rollout.hf_engine._RecordLogprobs samples softmax(scores / T) (a chi-square test against the exact
probabilities, which a sampler off by a temperature factor fails)."""
from __future__ import annotations

import random

import pytest
import torch

transformers_cache = pytest.importorskip("transformers.cache_utils")
if not hasattr(transformers_cache, "DynamicLayer"):
    pytest.skip("this transformers has no per-layer caches", allow_module_level=True)
from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: E402

from pebr.rollout.kv_cache import PreallocatedLayer, preallocate  # noqa: E402
from pebr.rollout.hf_engine import _RecordLogprobs  # noqa: E402


def _kv(B, H, S, D, g):
    return torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)


@pytest.mark.parametrize("capacity", [1, 5, 64])  # 1 and 5 force the buffers to grow
def test_same_contents_as_dynamic_layer(capacity):
    g = torch.Generator().manual_seed(random.randrange(10**6))
    ref, new = DynamicLayer(), PreallocatedLayer(capacity)
    steps = [3, 1, 1, 4, 1, 2]
    for i, s in enumerate(steps):
        k, v = _kv(2, 2, s, 8, g)
        rk, rv = ref.update(k, v)
        nk, nv = new.update(k, v)
        assert torch.equal(rk, nk) and torch.equal(rv, nv)
        assert new.get_seq_length() == ref.get_seq_length() == sum(steps[: i + 1])
    ref.crop(-3), new.crop(-3)
    assert torch.equal(ref.keys, new.keys) and new.get_seq_length() == ref.get_seq_length()
    k, v = _kv(2, 2, 2, 8, g)  # writes after a crop overwrite the cropped positions
    assert torch.equal(ref.update(k, v)[0], new.update(k, v)[0])
    ref.batch_repeat_interleave(3), new.batch_repeat_interleave(3)
    assert torch.equal(ref.keys, new.keys) and new.keys.shape[0] == 6
    idx = torch.tensor([5, 0, 2])
    ref.batch_select_indices(idx), new.batch_select_indices(idx)
    k, v = _kv(3, 2, 1, 8, g)
    assert torch.equal(ref.update(k, v)[1], new.update(k, v)[1])
    with pytest.raises(ValueError, match="negative"):
        new.crop(2)
    new.reset()
    assert new.get_seq_length() == 0 and not new.is_initialized


def test_preallocate_replaces_only_filled_dynamic_layers():
    g = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    for layer in range(3):
        cache.update(*_kv(2, 2, 4, 8, g), layer)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    assert preallocate(cache, extra_tokens=10) == 3
    assert all(isinstance(layer, PreallocatedLayer) and layer.capacity == 14 for layer in cache.layers)
    assert all(torch.equal(layer.keys, k) and torch.equal(layer.values, v) for layer, (k, v) in zip(cache.layers, before))
    assert cache.get_seq_length() == 4
    assert preallocate(cache, extra_tokens=10) == 0  # already replaced
    assert preallocate(object(), extra_tokens=10) == 0  # not a per-layer cache


def test_generate_with_preallocated_cache_matches(monkeypatch):
    """A greedy shared-prefix rollout gives the same tokens and log-probs with and without it."""
    from pebr.rollout import hf_engine as rollout
    from pebr.model.policy import build_tiny_policy
    from pebr.data.tasks import generate_items

    policy = build_tiny_policy(seed=3)
    items = generate_items(3, seed=random.randrange(10**6))
    engine = rollout.HFRollout(policy, shared_prefix=True)
    on = rollout.generate_rollouts(policy, items, n=2, temperature=0.0, max_new_tokens=12, engine=engine)
    calls = []
    monkeypatch.setattr(rollout, "preallocate", lambda cache, extra_tokens: calls.append(extra_tokens) or 0)
    off = rollout.generate_rollouts(policy, items, n=2, temperature=0.0, max_new_tokens=12, engine=engine)
    assert calls == [13]  # the last prompt column + the response budget
    assert torch.equal(on.sequences, off.sequences)
    torch.testing.assert_close(on.logprobs, off.logprobs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_gumbel_max_draws_follow_the_softmax(temperature):
    torch.manual_seed(random.randrange(10**6))
    V, draws = 6, 20000
    scores = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]])  # the last one suppressed
    proc = _RecordLogprobs(temperature, sample=True)
    out = proc(torch.zeros(draws, 1, dtype=torch.long), scores.expand(draws, V))
    picked = out.argmax(-1)
    counts = torch.bincount(picked, minlength=V).double()
    p = torch.softmax(scores.double() / temperature, -1)[0]
    assert counts[-1] == 0
    expected = p[:-1] * draws
    chi2 = float(((counts[:-1] - expected) ** 2 / expected).sum())
    assert chi2 < 25.7, (chi2, counts.tolist(), expected.tolist())  # 4 d.o.f.: p = 3e-5
    # the same draws judged against the softmax at another temperature fail
    wrong = torch.softmax(scores.double() / (temperature * 1.3), -1)[0][:-1] * draws
    assert float(((counts[:-1] - wrong) ** 2 / wrong).sum()) > 25.7
    # and the recorded log-probs are those of softmax(scores / T)
    torch.testing.assert_close(proc.prev[0].double(), torch.log(p), rtol=0, atol=1e-6)


def test_recording_without_sampling_returns_scores_unchanged():
    proc = _RecordLogprobs(0.0)
    scores = torch.randn(3, 7)
    assert proc(torch.zeros(3, 1, dtype=torch.long), scores) is scores
