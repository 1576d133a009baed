"""Items with several images, end to end on the tiny policy: prompts (one image-pad run per image,
in order), the single-image prompt unchanged, per-prompt pixel slicing in log-probs and in the
GRPO update, rewards, and the second image actually reaching the model."""
import copy
import dataclasses
import itertools

import pytest
import torch

from pebr.recipe import config as C
from pebr import rewards as R
from pebr.data import tasks
from pebr.run.distributed import World
from pebr.trainers.grpo import GRPOTrainer
from pebr.model.forward import image_features, response_logprobs
from pebr.model.policy import build_tiny_policy
from pebr.data.prompts import build_prompt
from pebr.rollout.hf_engine import generate_rollouts
from pebr.model.tokenizer import special_ids

# Sizes that are multiples of 28 inside the tiny policy's pixel bounds (56*56 .. 112*112), so the
# expected grid is [1, H/14, W/14] and the token count (H/28) * (W/28): 4, 6, 8 and 16 tokens.
SIZES = [(56, 56), (84, 56), (56, 112), (112, 112)]


@pytest.fixture(scope="module")
def policy():
    return build_tiny_policy(seed=0)


@pytest.fixture(scope="module")
def items():
    """Six built-in items; item k gets k % 3 extra images (0, 1, 2 extras), of other items' images
    resized to sizes that differ from each other and from the first image (112 x 112)."""
    base = tasks.generate_items(12, seed=31)
    sizes = itertools.cycle(SIZES[:3])
    out = []
    for k, it in enumerate(base[:6]):
        extras = [base[6 + (k + j) % 6].image.resize(next(sizes)) for j in range(k % 3)]
        out.append(dataclasses.replace(it, extra_images=extras))
    return out


def _grid(im) -> list[int]:
    w, h = im.size
    return [1, h // 14, w // 14]


def _runs(ids: list[int], token: int) -> list[int]:
    """Lengths of the runs of `token` in ids, in order."""
    return [len(list(g)) for key, g in itertools.groupby(ids) if key == token]


def _random_responses(policy, rows: int, width: int, seed: int) -> torch.Tensor:
    """[rows, width] ids drawn from the ordinary (non-special) vocabulary."""
    special = set(special_ids(policy.tokenizer).values())
    ordinary = torch.tensor([i for i in range(len(policy.tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    return ordinary[torch.randint(len(ordinary), (rows, width), generator=g)]


def _logprobs(policy, prompt, responses, group_size):
    """log-probs [P*n, R] of `responses` (rows p*n .. p*n+n-1 follow prompt p), no padding in them."""
    seq = torch.cat([prompt.input_ids.repeat_interleave(group_size, 0), responses], 1)
    att = torch.cat([prompt.attention_mask.repeat_interleave(group_size, 0), torch.ones_like(responses)], 1)
    with torch.no_grad():
        feats = image_features(policy.model, prompt.pixel_values, prompt.image_grid_thw)
        return response_logprobs(policy.model, seq, att, prompt_len=prompt.input_ids.shape[1], group_size=group_size,
                                 image_feats=feats, image_grid_thw=prompt.image_grid_thw,
                                 image_token_id=policy.image_token_id, images_per_prompt=prompt.images_per_prompt)


def test_one_image_pad_run_per_image_in_order(policy, items):
    b = policy.encode_prompts([it.images for it in items], [it.problem for it in items])
    images = [im for it in items for im in it.images]
    assert [len(it.images) for it in items] == [1, 2, 3, 1, 2, 3]
    assert b.images_per_prompt.tolist() == [1, 2, 3, 1, 2, 3]
    assert b.image_grid_thw.tolist() == [_grid(im) for im in images]  # one row per image, prompt order
    assert b.pixel_values.shape[0] == sum(g[0] * g[1] * g[2] for g in map(_grid, images))
    ids = special_ids(policy.tokenizer)
    for p, it in enumerate(items):
        row = b.input_ids[p][b.attention_mask[p].bool()].tolist()
        assert _runs(row, policy.image_token_id) == [(h // 28) * (w // 28) for w, h in (im.size for im in it.images)]
        # each run sits between <|vision_start|> and <|vision_end|>, the images before the text
        starts = [i for i, t in enumerate(row) if t == ids["<|vision_start|>"]]
        ends = [i for i, t in enumerate(row) if t == ids["<|vision_end|>"]]
        assert len(starts) == len(ends) == len(it.images)
        assert all(row[s + 1 : e] == [policy.image_token_id] * (e - s - 1) for s, e in zip(starts, ends))
        assert all(e + 1 == s for e, s in zip(ends, starts[1:]))  # images back to back, text after the last
    # each prompt's pixel rows are its images' own, whatever else is in the batch
    for p in (2, 4):
        alone, _ = policy.images(items[p].images)
        assert torch.equal(b.select([p]).pixel_values, alone)
        assert b.select([p]).image_grid_thw.tolist() == [_grid(im) for im in items[p].images]


def test_single_image_prompt_is_unchanged(policy, items):
    """A one-image item, given as a PIL image (the old interface) or as a list of one, encodes to the
    chat text with one 16-token <|image_pad|> run, as before several images existed."""
    it = items[3]
    assert it.extra_images == []
    text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>" + build_prompt(it.problem)
            + "<|im_end|>\n<|im_start|>assistant\n")
    expected = policy.tokenizer(text, add_special_tokens=False).input_ids
    pv, grid = policy.images([it.image])
    for images in ([it.image], [[it.image]], [it.images]):
        b = policy.encode_prompts(images, [it.problem])
        assert b.input_ids[0].tolist() == expected and b.attention_mask.all()
        assert torch.equal(b.pixel_values, pv) and b.image_grid_thw.tolist() == [[1, 8, 8]] == grid.tolist()
        assert b.images_per_prompt.tolist() == [1]
    # in a batch with multi-image prompts its row (past the left padding) is the same
    mixed = policy.encode_prompts([items[2].images, it.image], [items[2].problem, it.problem])
    assert mixed.input_ids[1][mixed.attention_mask[1].bool()].tolist() == expected
    assert torch.equal(mixed.select([1]).pixel_values, pv)
    with pytest.raises(ValueError, match="at least one image"):
        policy.encode_prompts([[]], [it.problem])


def test_batched_logprobs_equal_alone(policy, items):
    """The log-probs of every prompt's responses in a batch of 1-, 2- and 3-image prompts equal
    transformers' own path (pixel_values of every row's images, each row's grid rows, built from the
    items), those of the prompt encoded alone (other left padding) and of the prompt selected from
    the batch: each row reads its own prompt's images' features and grid rows, in order."""
    import engine.patching

    n, width = 2, 6
    prompt = policy.encode_prompts([it.images for it in items], [it.problem for it in items])
    resp = _random_responses(policy, len(items) * n, width, seed=5)
    batch = _logprobs(policy, prompt, resp, n)
    assert torch.isfinite(batch).all()
    per_row = [policy.images(it.images) for it in items for _ in range(n)]
    seq = torch.cat([prompt.input_ids.repeat_interleave(n, 0), resp], 1)
    with torch.no_grad():
        full = engine.patching.token_logprobs_from_model(
            policy.model, input_ids=seq, attention_mask=torch.cat([prompt.attention_mask.repeat_interleave(n, 0),
                                                                   torch.ones_like(resp)], 1),
            pixel_values=torch.cat([pv for pv, _ in per_row]), image_grid_thw=torch.cat([g for _, g in per_row]))
    torch.testing.assert_close(batch, full[:, prompt.input_ids.shape[1] - 1 :], atol=1e-4, rtol=1e-4)
    for p, it in enumerate(items):
        rows = resp[p * n : (p + 1) * n]
        alone = _logprobs(policy, policy.encode_prompts([it.images], [it.problem]), rows, n)
        torch.testing.assert_close(batch[p * n : (p + 1) * n], alone, atol=1e-4, rtol=1e-4)
    sub = [5, 1, 3]  # out of order, and prompts whose first image is not image number p
    picked = _logprobs(policy, prompt.select(sub), torch.cat([resp[p * n : (p + 1) * n] for p in sub]), n)
    torch.testing.assert_close(picked, torch.cat([batch[p * n : (p + 1) * n] for p in sub]), atol=1e-5, rtol=1e-5)


def test_sft_batch_of_multi_image_items(policy, items):
    """Warm-up SFT's batch carries each row's image count; its log-probs equal the item's alone."""
    from pebr.trainers.sft import make_sft_batch

    def nll(b):
        with torch.no_grad():
            feats = image_features(policy.model, b.pixel_values, b.image_grid_thw)
            logp = response_logprobs(policy.model, b.sequences, b.attention_mask, prompt_len=b.prompt_len,
                                     group_size=1, image_feats=feats, image_grid_thw=b.image_grid_thw,
                                     image_token_id=policy.image_token_id, images_per_prompt=b.images_per_prompt)
        return -(logp * b.response_mask).sum(1)

    batch = make_sft_batch(policy, items)
    assert batch.images_per_prompt.tolist() == [1, 2, 3, 1, 2, 3]
    alone = torch.cat([nll(make_sft_batch(policy, [it])) for it in items])
    torch.testing.assert_close(nll(batch), alone, atol=1e-3, rtol=1e-5)


def _update(policy, cfg, ro, adv, items, run_dir):
    trainer = GRPOTrainer(cfg, policy=policy, reference=copy.deepcopy(policy), items=items, reward_fn=None,
                          run_dir=run_dir, init_model=None, world=World())
    grads = {}
    trainer.opt.register_step_pre_hook(lambda *_: grads.update(
        {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}))
    return trainer.update(ro, adv), grads


def test_rollout_and_grpo_update(policy, items, tmp_path):
    """Rollouts of 1-, 2- and 3-image items, then one GRPO update: finite loss, non-zero gradients in
    the language model and the vision tower, and the same loss and gradients with one group per
    micro-batch (each slicing its prompt's images out of the batch) as with all groups in one."""
    torch.manual_seed(3)
    ro = generate_rollouts(policy, items, n=2, temperature=1.0, max_new_tokens=8)
    assert ro.sequences.shape[0] == 12 and ro.prompt.images_per_prompt.tolist() == [1, 2, 3, 1, 2, 3]
    assert ro.select_groups([2]).prompt.image_grid_thw.tolist() == [_grid(im) for im in items[2].images]
    adv = torch.randn(12, generator=torch.Generator().manual_seed(4))
    cfg = dataclasses.replace(C.preset("tiny", stage=1), group_size=2, rollout_batch=6, mini_batch=6, max_new_tokens=8,
                              kl_coef=0.05, freeze_vision=False, progress=False)
    results = [_update(copy.deepcopy(policy), dataclasses.replace(cfg, micro_batch=m), ro, adv, items,
                       str(tmp_path / str(m))) for m in (2, 12)]
    (m_small, g_small), (m_big, g_big) = results
    assert torch.isfinite(torch.tensor(m_small["loss"])) and m_small["skipped"] == 0
    assert m_small["grad_norm"] > 0 and torch.isfinite(torch.tensor(m_small["grad_norm"]))
    assert any("visual" in k and float(g.abs().max()) > 0 for k, g in g_small.items()), "vision tower got no gradient"
    assert any("visual" not in k and float(g.abs().max()) > 0 for k, g in g_small.items())
    assert m_small["loss"] == pytest.approx(m_big["loss"], rel=1e-5, abs=1e-7)
    assert g_small.keys() == g_big.keys()
    gmax = max(float(g.abs().max()) for g in g_big.values())
    for k in g_big:
        assert float((g_small[k] - g_big[k]).abs().max()) <= 1e-5 * gmax, k


class _SizeScorer:
    """A stand-in ClipScorer whose cosine depends on the image only: its width / 400."""

    def similarity(self, texts, images):
        assert len(texts) == len(images)
        return [im.size[0] / 400 for im in images]


def test_rewards_on_multi_image_item(items, tmp_path):
    from test_rewards_clip import _save_tiny_contrastive

    it = items[2]  # images 112, 84 and 56 wide
    resp = it.reference_response
    # the clip term is the mean cosine over the item's images: (0.28 + 0.21 + 0.14) / 3 = 0.21 -> 0.525
    assert R.clip_reward(resp, it.images, _SizeScorer()) == pytest.approx(0.21 / 0.4)
    assert R.clip_reward(resp, it.image, _SizeScorer()) == pytest.approx(0.28 / 0.4)  # one image: as before
    out = R.perception_reward(resp, it, num_tokens=40, scorer=_SizeScorer())
    assert out["clip"] == pytest.approx(0.21 / 0.4) and 0 < out["overall"] <= 1
    # a real (tiny, random) CLIP: the mean of its per-image cosines, scaled
    _save_tiny_contrastive(str(tmp_path), "clip")
    scorer = R.ClipScorer.from_pretrained(str(tmp_path))
    desc = R.extract_description(resp)
    cos = [scorer.similarity([desc], [im])[0] for im in it.images]
    assert len(set(cos)) == 3
    assert R.perception_reward(resp, it, num_tokens=40, scorer=scorer)["clip"] == pytest.approx(
        R.clip_score_to_reward(sum(cos) / 3), abs=1e-6)
    scene = R.perception_reward(resp, it, num_tokens=40)  # no scorer: the scene term, as for one image
    assert scene["scene"] > 0 and R.reasoning_reward(resp, it)["accuracy"] == 1.0


def test_second_image_is_seen(policy, items):
    """Replacing the second image (same size, other content) changes the log-probs of the same
    response; the other prompts of the batch are untouched."""
    it, other = items[1], items[4]
    second = it.extra_images[0]
    swapped = dataclasses.replace(it, extra_images=[tasks.generate_items(1, seed=77)[0].image.resize(second.size)])
    resp = _random_responses(policy, 4, 8, seed=9)
    a = _logprobs(policy, policy.encode_prompts([it.images, other.images], [it.problem, other.problem]), resp, 2)
    b = _logprobs(policy, policy.encode_prompts([swapped.images, other.images], [it.problem, other.problem]), resp, 2)
    assert float((a[:2] - b[:2]).abs().max()) > 1e-3
    torch.testing.assert_close(a[2:], b[2:], atol=1e-5, rtol=1e-5)
