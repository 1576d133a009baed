"""Shared-prefix rollouts (HFRollout(shared_prefix=True)): the prompt is prefilled once per prompt
and its cache repeated to the n responses. The same tokens and sampled log-probs as every row
prefilling its own prompt (greedy and sampled, Qwen2.5-VL and Qwen2-VL, left padding, several
images in one item), with the prompt's decoder work counted: P*(L-1) + P*n tokens, not P*n*L."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from pebr.model.forward import encoder_outputs, image_features, rows_image_grid
from pebr.model.policy import Policy, build_tiny_policy
from pebr.rollout.hf_engine import HFRollout, generate_rollouts
from pebr.data.tasks import generate_items
from tests.tiny_models import qwen2_fixture


@pytest.fixture(scope="module")
def qwen25():
    return build_tiny_policy(seed=5)


qwen2 = qwen2_fixture(seed=13)


def _items(prompts: int, seed: int) -> list:
    """Fresh items of different prompt lengths (extra words), the second one showing two images."""
    rng = random.Random(seed)
    items = generate_items(prompts, seed=seed)
    items = [dataclasses.replace(it, problem=it.problem + " please" * rng.randint(0, 7)) for it in items]
    items[1] = dataclasses.replace(items[1], extra_images=[items[0].image])
    return items


def _rollouts(policy: Policy, items, *, n: int, temperature: float, shared: bool, seed: int = 0, new: int = 10):
    torch.manual_seed(seed)
    return generate_rollouts(policy, items, n=n, temperature=temperature, max_new_tokens=new,
                             engine=HFRollout(policy, shared_prefix=shared))


def _assert_same(a, b, atol: float = 1e-5):
    assert a.prompt.attention_mask.sum(1).unique().numel() > 1, "prompts must differ in length (left padding)"
    assert torch.equal(a.sequences, b.sequences), "the shared prefix changed the generated tokens"
    torch.testing.assert_close(b.logprobs, a.logprobs, rtol=0, atol=atol)
    assert a.num_tokens == b.num_tokens and a.texts == b.texts


@pytest.mark.parametrize("n", [1, 3])
def test_greedy_same_tokens_and_logprobs(qwen25, n):
    items = _items(3, seed=random.randrange(10**6))
    off = _rollouts(qwen25, items, n=n, temperature=0.0, shared=False)
    on = _rollouts(qwen25, items, n=n, temperature=0.0, shared=True)
    _assert_same(off, on)
    for p in range(len(items)):  # greedy: every row of a group is the same response
        rows = on.sequences[p * n : (p + 1) * n]
        assert (rows == rows[:1]).all()
    assert max(on.num_tokens) > 1, "responses must hold several tokens for the cache to matter"


def test_sampling_same_draws_and_teacher_forced_logprobs(qwen25):
    items = _items(3, seed=random.randrange(10**6))
    n, seed = 4, random.randrange(10**6)
    off = _rollouts(qwen25, items, n=n, temperature=1.0, shared=False, seed=seed, new=12)
    on = _rollouts(qwen25, items, n=n, temperature=1.0, shared=True, seed=seed, new=12)
    _assert_same(off, on)  # the same logits up to rounding, so the same RNG draws pick the same tokens
    assert len({tuple(r) for r in on.sequences.tolist()}) > len(items), "sampling must give different responses"
    # The recorded log-probs are the model's own, teacher-forced, over the whole vocabulary: what
    # the trainer recomputes (and takes in their place as old log-probs). The fresh policy gives
    # the vision tokens real mass, so log-probs renormalized without them are measurably off.
    torch.testing.assert_close(on.logprobs, _teacher_forced(qwen25, on), rtol=0, atol=1e-4)
    suppressed = _teacher_forced(qwen25, on, suppress_vision=True)
    assert float((on.logprobs - suppressed).abs().max()) > 1e-3, "the check cannot tell the two apart"
    # and no vision token was ever sampled
    responses = on.sequences[:, on.prompt_len :]
    assert not torch.isin(responses, torch.tensor(qwen25.vision_token_ids)).any()


def test_vision_tokens_never_sampled_even_when_likely(qwen25):
    """A policy whose vision tokens hold most of the mass still never samples one, and records
    the log-probs of what it does sample with that mass counted (as the trainer computes them)."""
    items = _items(2, seed=random.randrange(10**6))
    vision = torch.tensor(qwen25.vision_token_ids)

    def favour_vision(module, args, out):  # +8 on the vision tokens' logits: most of the mass
        out = out.clone()
        out[..., vision] += 8.0
        return out

    hook = qwen25.model.get_output_embeddings().register_forward_hook(favour_vision)
    try:
        ro = _rollouts(qwen25, items, n=4, temperature=1.0, shared=True, seed=random.randrange(10**6), new=8)
        ref = _teacher_forced(qwen25, ro)
        mass = 1 - (_teacher_forced(qwen25, ro, suppress_vision=True) - ref).exp().reciprocal()
    finally:
        hook.remove()
    real = ro.response_mask.bool()
    assert float(mass[real].mean()) > 0.5, "the vision tokens must hold most of the mass for this test"
    assert not torch.isin(ro.sequences[:, ro.prompt_len :], vision).any()
    torch.testing.assert_close(ro.logprobs, ref, rtol=0, atol=1e-4)


def _teacher_forced(policy: Policy, ro, suppress_vision: bool = False) -> torch.Tensor:
    """[P*n, R] log-probs of ro's response tokens from one whole-sequence forward (no cache) over the
    whole vocabulary (suppress_vision: the vision tokens' logits at -inf first); 0 after the end."""
    model, n, L = policy.model, ro.group_size, ro.prompt_len
    with torch.no_grad():
        feats = image_features(model, ro.prompt.pixel_values, ro.prompt.image_grid_thw)
        out = model.model(
            input_ids=ro.sequences, attention_mask=ro.attention_mask,
            image_grid_thw=rows_image_grid(ro.prompt.image_grid_thw, n, ro.prompt.images_per_prompt),
            mm_token_type_ids=(ro.sequences == policy.image_token_id).to(torch.int32),
            mm_encoder_outputs=encoder_outputs(feats, n, ro.prompt.images_per_prompt), use_cache=False)
        logits = model.get_output_embeddings()(out.last_hidden_state[:, L - 1 : -1]).float()
    if suppress_vision:
        logits[..., policy.vision_token_ids] = float("-inf")
    lp = torch.log_softmax(logits, -1).gather(-1, ro.sequences[:, L:, None]).squeeze(-1)
    return lp.masked_fill(ro.response_mask == 0, 0.0)


def _count_decoder_work(policy: Policy, items, *, n: int, shared: bool):
    """(calls of the first decoder layer as (rows, tokens), vision tower calls) for one rollout."""
    base = policy.model.model
    calls, vision = [], []
    h1 = base.language_model.layers[0].register_forward_pre_hook(
        lambda m, args, kw: calls.append(tuple((args[0] if args else kw["hidden_states"]).shape[:2])), with_kwargs=True)
    h2 = base.visual.register_forward_pre_hook(lambda m, args: vision.append(1))
    try:
        ro = _rollouts(policy, items, n=n, temperature=1.0, shared=shared, new=6)
    finally:
        h1.remove()
        h2.remove()
    return ro, calls, vision


def test_prompt_prefilled_once_per_prompt(qwen25):
    items = _items(4, seed=random.randrange(10**6))
    P, n = len(items), 3
    on, calls, vision = _count_decoder_work(qwen25, items, n=n, shared=True)
    L = on.prompt_len
    decode = calls[-(on.sequences.shape[1] - L - 1):] if on.sequences.shape[1] - L > 1 else []
    # The P prompts' first L-1 tokens once, then the last prompt token of each of the P*n rows.
    assert calls[0] == (P, L - 1)
    assert calls[1] == (P * n, 1)
    assert all(c == (P * n, 1) for c in decode) and len(calls) == 2 + len(decode)
    prompt_tokens = P * (L - 1) + P * n
    assert prompt_tokens < P * n * L
    assert len(vision) == 1, "the vision tower runs once over the P prompts' images"
    # Off: every row prefills the whole prompt (the count the shared path avoids).
    off, calls_off, vision_off = _count_decoder_work(qwen25, items, n=n, shared=False)
    assert calls_off[0] == (P * n, L) and len(vision_off) == 1


def test_a_model_that_cannot_falls_back_logged_once(qwen25, monkeypatch):
    import pebr.rollout.hf_engine as rollout

    items = _items(2, seed=random.randrange(10**6))
    lines = []
    monkeypatch.setattr(rollout, "shared_prefix_support", lambda model: "no get_rope_index (test)")
    engine = HFRollout(qwen25, shared_prefix=True, log=lines.append)
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        outs.append(generate_rollouts(qwen25, items, n=2, temperature=1.0, max_new_tokens=5, engine=engine))
    assert len(lines) == 1 and "no get_rope_index (test)" in lines[0]
    torch.manual_seed(1)
    off = generate_rollouts(qwen25, items, n=2, temperature=1.0, max_new_tokens=5,
                            engine=HFRollout(qwen25, shared_prefix=False))
    assert torch.equal(outs[1].sequences, off.sequences)


def test_qwen2_vl_greedy_matches(qwen2):
    items = _items(3, seed=random.randrange(10**6))
    off = _rollouts(qwen2, items, n=2, temperature=0.0, shared=False)
    on = _rollouts(qwen2, items, n=2, temperature=0.0, shared=True)
    _assert_same(off, on)
    assert max(on.num_tokens) > 1
