"""The shared-prefix path (pebr/model/shared_prefix.py) gives the unshared path's log-probs, entropies
and every parameter gradient (fp32), for Qwen2.5-VL and Qwen2-VL, with left-padded prompts of
different lengths, mrope positions, several groups and responses of different lengths."""
from __future__ import annotations

import random

import pytest
import torch

from pebr.model.forward import image_features, response_logprobs
from pebr.model.policy import Policy, build_tiny_policy
from pebr.model.shared_prefix import shared_prefix_logprobs, supports
from pebr.data.tasks import generate_items
from tests.tiny_models import qwen2_fixture


@pytest.fixture(scope="module")
def qwen25():
    return build_tiny_policy(seed=3)


qwen2 = qwen2_fixture(seed=11)


def _inputs(policy: Policy, *, prompts: int, n: int, width: int, seed: int):
    """P prompts of different lengths (left padding) and P*n random responses of random lengths."""
    rng = random.Random(seed)
    items = generate_items(prompts, seed=seed)
    problems = [it.problem + " please" * rng.randint(0, 6) for it in items]  # different prompt lengths
    prompt = policy.encode_prompts([it.image for it in items], problems)
    assert len(set(prompt.attention_mask.sum(1).tolist())) > 1, "prompts must differ in length"
    banned = set(policy.vision_token_ids)
    vocab = [i for i in range(policy.model.config.text_config.vocab_size) if i not in banned]
    responses = torch.tensor([[rng.choice(vocab) for _ in range(width)] for _ in range(prompts * n)])
    lengths = [rng.randint(1, width) for _ in range(prompts * n)]
    lengths[0] = width  # one full-width response
    mask = torch.zeros(prompts * n, width)
    for r, k in enumerate(lengths):
        mask[r, :k] = 1
        responses[r, k:] = policy.pad_id
    return prompt, responses, mask


def _run(policy: Policy, prompt, responses, mask, n: int, *, shared: bool):
    model = policy.model
    model.train()
    model.zero_grad(set_to_none=True)
    feats = image_features(model, prompt.pixel_values, prompt.image_grid_thw)
    kw = dict(group_size=n, image_feats=feats, image_grid_thw=prompt.image_grid_thw,
              image_token_id=policy.image_token_id, return_entropy=True, temperature=0.9)
    if shared:
        logp, ent = shared_prefix_logprobs(model, prompt.input_ids, prompt.attention_mask, responses, mask, **kw)
    else:
        L = prompt.input_ids.shape[1]
        seqs = torch.cat([prompt.input_ids.repeat_interleave(n, 0), responses], dim=1)
        att = torch.cat([prompt.attention_mask.repeat_interleave(n, 0), mask.long()], dim=1)
        logp, ent = response_logprobs(model, seqs, att, prompt_len=L, **kw)
    # A loss that weighs every token differently, so a gradient routed to the wrong row shows.
    w = torch.linspace(0.5, 1.5, logp.numel()).reshape(logp.shape)
    ((logp * w * mask).sum() + 0.3 * (ent * mask).sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return (logp * mask).detach(), (ent * mask).detach(), grads


@pytest.mark.parametrize("which", ["qwen2_5_vl", "qwen2_vl"])
def test_shared_prefix_equals_unshared(which, qwen25, qwen2):
    policy = qwen25 if which == "qwen2_5_vl" else qwen2
    n = 3
    prompt, responses, mask = _inputs(policy, prompts=3, n=n, width=9, seed=random.randrange(10**6))
    a_logp, a_ent, a_grad = _run(policy, prompt, responses, mask, n, shared=False)
    b_logp, b_ent, b_grad = _run(policy, prompt, responses, mask, n, shared=True)
    torch.testing.assert_close(b_logp, a_logp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(b_ent, a_ent, rtol=1e-5, atol=2e-5)
    assert a_grad.keys() == b_grad.keys()
    assert any("visual" in k for k in a_grad), "the vision tower must get gradients on both paths"
    for k in a_grad:
        scale = float(a_grad[k].abs().max()) + 1e-12
        err = float((b_grad[k] - a_grad[k]).abs().max())
        assert err <= 1e-4 * scale, f"{k}: gradient differs by {err:.3g} (max |grad| {scale:.3g})"


def test_shared_prefix_sees_the_prompt(qwen25):
    """A different question (same image) changes the responses' log-probs: the prefix is attended to."""
    policy = qwen25
    prompt, responses, mask = _inputs(policy, prompts=2, n=2, width=5, seed=1)
    model = policy.model
    with torch.no_grad():
        feats = image_features(model, prompt.pixel_values, prompt.image_grid_thw)
        kw = dict(group_size=2, image_feats=feats, image_grid_thw=prompt.image_grid_thw,
                  image_token_id=policy.image_token_id)
        base = shared_prefix_logprobs(model, prompt.input_ids, prompt.attention_mask, responses, mask, **kw)
        ids = prompt.input_ids.clone()
        ids[:, -3] = (ids[:, -3] + 1) % 50  # a text token of the template/question
        other = shared_prefix_logprobs(model, ids, prompt.attention_mask, responses, mask, **kw)
    assert not torch.allclose(base, other)


def test_supports_names_what_it_cannot_handle(qwen25):
    assert supports(qwen25.model) is None
    reason = supports(torch.nn.Linear(2, 2))
    assert reason and "Qwen2-VL" in reason


def test_shape_errors(qwen25):
    prompt, responses, mask = _inputs(qwen25, prompts=2, n=2, width=4, seed=2)
    feats = image_features(qwen25.model, prompt.pixel_values, prompt.image_grid_thw)
    with pytest.raises(ValueError, match="responses has 3 rows; expected 2 prompts x 2"):
        shared_prefix_logprobs(qwen25.model, prompt.input_ids, prompt.attention_mask, responses[:3], mask[:3],
                               group_size=2, image_feats=feats, image_grid_thw=prompt.image_grid_thw,
                               image_token_id=qwen25.image_token_id)
