"""The tiny policy, its tokenizer, prompts, rollouts and the shared-image log-probs."""
import pytest
import torch

from pebr.data import tasks
from pebr.model.forward import image_features, response_logprobs
from pebr.model.policy import build_tiny_policy, left_pad, load_policy
from pebr.rollout.hf_engine import generate_rollouts, response_mask_from
from pebr.model.tokenizer import SPECIAL_TOKENS, build_tokenizer, special_ids


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return build_tiny_policy(seed=0)


@pytest.fixture(scope="module")
def items():
    return tasks.generate_items(4, seed=7)


def test_tokenizer_round_trip_and_specials(tmp_path):
    tok = build_tokenizer(corpus=["the red circle is at the top left"] * 20, vocab_size=300)
    ids = special_ids(tok)
    assert set(ids) == set(SPECIAL_TOKENS) and len(set(ids.values())) == len(SPECIAL_TOKENS)
    text = "### Image Description: a red circle, 3 squares.\n### The final answer is: 3"
    assert tok.decode(tok(text).input_ids) == text
    # learned merges shorten the text that the corpus holds
    assert len(tok("the red circle").input_ids) < len("the red circle")
    chat = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat.count("<|image_pad|>") == 1 and chat.endswith("<|im_start|>assistant\n")
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text).input_ids == tok(text).input_ids
    assert special_ids(again) == ids


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(corpus=[], vocab_size=100)


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_encode_prompts_expands_image_tokens(policy, items):
    b = policy.encode_prompts([it.image for it in items], [it.problem for it in items])
    n_img = policy.images.num_tokens(b.image_grid_thw)
    assert ((b.input_ids == policy.image_token_id).sum(1) == n_img).all()
    assert (b.mm_token_type_ids.bool() == (b.input_ids == policy.image_token_id)).all()
    assert (b.attention_mask[:, -1] == 1).all()  # left padding: every prompt ends at the last column
    assert b.pixel_values.shape[0] == int(b.image_grid_thw.prod(-1).sum())
    with pytest.raises(ValueError, match="same length"):
        policy.encode_prompts([items[0].image], ["a", "b"])


def test_images_match_transformers_processor(policy, items):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pv, grid = policy.images([it.image for it in items[:2]])
    ref = Qwen2VLImageProcessorPil()(images=[it.image for it in items[:2]], return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(pv, ref["pixel_values"], atol=1e-5, rtol=1e-5)


def test_response_mask_from():
    eos = [9]
    resp = torch.tensor([[1, 2, 9, 0, 0], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]])
    mask, truncated = response_mask_from(resp, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated == [False, True, False]


def test_rollouts_groups_and_masks(policy, items):
    torch.manual_seed(1)
    ro = generate_rollouts(policy, items[:2], n=3, temperature=1.0, max_new_tokens=12)
    assert ro.sequences.shape[0] == 6 and len(ro.texts) == 6
    assert ro.item_of(4) is items[1]
    resp = ro.sequences[:, ro.prompt_len :]
    assert not torch.isin(resp, torch.tensor(policy.vision_token_ids)).any()  # never generated
    assert ro.response_mask.sum(1).long().tolist() == ro.num_tokens
    # rows of one group share their prompt
    assert torch.equal(ro.sequences[0, : ro.prompt_len], ro.sequences[2, : ro.prompt_len])
    sub = ro.select_groups([1])
    assert sub.items == [items[1]] and torch.equal(sub.sequences, ro.sequences[3:])
    assert sub.prompt.pixel_values.shape[0] == int(sub.prompt.image_grid_thw.prod(-1).sum())


def test_shared_image_logprobs_match_repeated_pixels(policy, items):
    """The image encoded once per prompt and expanded to its n responses gives the same log-probs
    and the same gradients as transformers' path with pixel_values repeated n times."""
    import engine.patching

    torch.manual_seed(2)
    n = 2
    ro = generate_rollouts(policy, items[:2], n=n, temperature=1.0, max_new_tokens=10)
    model = policy.model
    L = ro.prompt_len
    p = ro.prompt
    feats = image_features(model, p.pixel_values, p.image_grid_thw)
    ours = response_logprobs(model, ro.sequences, ro.attention_mask, prompt_len=L, group_size=n, image_feats=feats,
                             image_grid_thw=p.image_grid_thw, image_token_id=policy.image_token_id)
    (ours * ro.response_mask).sum().backward()
    g_ours = {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None and "visual" in k}
    model.zero_grad(set_to_none=True)
    sizes = p.image_grid_thw.prod(-1).tolist()
    chunks = torch.split(p.pixel_values, sizes)
    pix = torch.cat([c for c in chunks for _ in range(n)])
    full = engine.patching.token_logprobs_from_model(
        model, input_ids=ro.sequences, attention_mask=ro.attention_mask, pixel_values=pix,
        image_grid_thw=p.image_grid_thw.repeat_interleave(n, 0),
        mm_token_type_ids=(ro.sequences == policy.image_token_id).int())
    theirs = full[:, L - 1 :]
    m = ro.response_mask.bool()
    torch.testing.assert_close(ours[m], theirs[m], atol=1e-4, rtol=1e-4)
    (theirs * ro.response_mask).sum().backward()
    assert g_ours, "the vision tower got no gradient"
    for k, g in g_ours.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[k].grad, atol=1e-4, rtol=1e-3, msg=k)
    model.zero_grad(set_to_none=True)


def test_save_and_load_policy(policy, items, tmp_path):
    policy.save(tmp_path)
    again = load_policy(tmp_path)
    b1 = policy.encode_prompts([items[0].image], [items[0].problem])
    b2 = again.encode_prompts([items[0].image], [items[0].problem])
    assert torch.equal(b1.input_ids, b2.input_ids) and torch.equal(b1.pixel_values, b2.pixel_values)
    sd1, sd2 = policy.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_load_policy_rejects_non_model_folder(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_policy(tmp_path)


def test_engine_patch_embed_matches_conv3d(policy, items):
    from engine.patching import unpatch_model

    assert getattr(policy.model.model.visual.patch_embed, "_engine_patched", False)
    b = policy.encode_prompts([items[0].image], [items[0].problem])
    patched = image_features(policy.model, b.pixel_values, b.image_grid_thw)[0]
    unpatch_model(policy.model)
    try:
        plain = image_features(policy.model, b.pixel_values, b.image_grid_thw)[0]
    finally:
        from engine.patching import patch_model

        patch_model(policy.model)
    torch.testing.assert_close(patched, plain, atol=1e-4, rtol=1e-4)
