"""Real widths without a download (pebr/model/sizes.py): Qwen2.5-VL-3B's and -7B's published
architecture, depth cut, our tokenizer padded to the 151,936-row head; the head's rows past the
tokenizer are never sampled; a saved folder works as --model; and one GRPO step at 3B's widths
(2 decoder layers, 1 vision block, a 448 x 448 image, n = 2, 32 tokens) runs, so it never silently
breaks. The bench at full scale: bench/real_shapes.py."""
import dataclasses
import random

import pytest
import torch

from pebr.data.tasks import generate_items
from pebr.model.policy import load_policy
from pebr.model.sizes import (
    QWEN25_VL_VISION,
    REAL_IMAGE_SIZE,
    REAL_SIZES,
    build_sized_policy,
    real_config,
)
from pebr.recipe import config as C
from pebr.rollout.hf_engine import generate_rollouts
from pebr.run.distributed import World
from pebr.trainers.grpo import GRPOTrainer


def test_configs_follow_the_published_architectures():
    for name, size in REAL_SIZES.items():
        cfg = real_config(name, text_layers=3, vision_blocks=9)
        t, v = cfg.text_config, cfg.vision_config
        assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.vocab_size) == \
            (size.hidden_size, size.intermediate_size, size.num_attention_heads, size.num_key_value_heads, size.vocab_size)
        assert t.num_hidden_layers == 3 and v.depth == 9 and v.out_hidden_size == size.hidden_size
        assert v.hidden_size == 1280 and v.num_heads == 16 and v.intermediate_size == 3420 and v.window_size == 112
        assert v.fullatt_block_indexes == [7]  # the real layout's blocks below the cut
        assert cfg.tie_word_embeddings == size.tie_word_embeddings
        full = real_config(name)
        assert full.text_config.num_hidden_layers == size.num_hidden_layers and full.vision_config.depth == 32
        assert full.vision_config.fullatt_block_indexes == QWEN25_VL_VISION["fullatt_block_indexes"]
        assert real_config(name, vision_blocks=2).vision_config.fullatt_block_indexes == [1]  # still one full block
    assert REAL_SIZES["qwen2.5-vl-3b"].tie_word_embeddings and not REAL_SIZES["qwen2.5-vl-7b"].tie_word_embeddings
    with pytest.raises(ValueError, match="model size"):
        real_config("qwen2.5-vl-72b")
    with pytest.raises(ValueError, match=">= 1"):
        real_config("qwen2.5-vl-3b", text_layers=0)


@pytest.fixture(scope="module")
def policy_3b():
    return build_sized_policy("qwen2.5-vl-3b", text_layers=2, vision_blocks=1, seed=random.randrange(1000))


def _item(seed):
    return generate_items(1, seed=seed, image_size=REAL_IMAGE_SIZE)[0]


def test_the_head_rows_past_the_tokenizer_are_never_sampled(policy_3b, tmp_path):
    tok, head = policy_3b.tokenizer, policy_3b.model.get_output_embeddings().weight
    assert head.shape == (151936, 2048) and len(tok) < 2000
    never = set(policy_3b.never_sampled_ids)
    assert set(range(len(tok), 151936)) <= never and set(policy_3b.vision_token_ids) <= never
    item = _item(random.randrange(10**6))
    torch.manual_seed(random.randrange(10**6))
    # random weights spread the mass over the whole head: without the suppression nearly every
    # sampled token (99.5% of the rows) would be one no text decodes to
    ro = generate_rollouts(policy_3b, [item], n=2, temperature=1.0, max_new_tokens=16)
    sampled = ro.sequences[:, ro.prompt_len:][ro.response_mask.bool()]
    assert sampled.numel() > 0 and int(sampled.max()) < len(tok)
    assert not set(sampled.tolist()) & set(policy_3b.vision_token_ids)
    # a folder saved at these widths (a tokenizer smaller than the vocabulary, as Qwen's own) loads as --model
    path = tmp_path / "qwen2.5-vl-3b-2l"
    policy_3b.save(str(path))
    loaded = load_policy(str(path))
    assert loaded.never_sampled_ids == policy_3b.never_sampled_ids
    assert loaded.model.config.tie_word_embeddings
    assert loaded.model.get_output_embeddings().weight.data_ptr() == loaded.model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(loaded.model.get_output_embeddings().weight, head)


def test_one_grpo_step_at_3b_widths(policy_3b, tmp_path):
    cfg = dataclasses.replace(C.preset("paper", 2), dtype="float32", group_size=2, rollout_batch=1, mini_batch=1,
                              micro_batch=2, max_new_tokens=32, temperature=1.0, top_p=1.0, progress=False,
                              lr=1e-6, max_steps=1, model_size="qwen2.5-vl-3b")
    reference = build_sized_policy("qwen2.5-vl-3b", text_layers=2, vision_blocks=1, seed=1)
    reference.model.eval().requires_grad_(False)
    item = _item(random.randrange(10**6))
    assert policy_3b.images.num_tokens(policy_3b.images([item.image])[1]).item() == 256  # 448 x 448 -> 256 tokens
    reward = lambda text, it, k: {"overall": random.random()}  # noqa: E731  (a signal in every group)
    trainer = GRPOTrainer(cfg, policy=policy_3b, reference=reference, items=[item], reward_fn=reward,
                          run_dir=str(tmp_path / "s"), init_model=None, world=World(), log=lambda m: None)
    before = policy_3b.model.get_output_embeddings().weight[:64].detach().clone()  # a slice: the head is 1.2 GB
    m = trainer.train_step()
    assert m["updates"] == 1 and m["skipped"] == 0 and m["groups_kept"] == 1
    for k in ("loss", "kl", "entropy", "grad_norm", "peak_mem_mb"):
        assert torch.isfinite(torch.tensor(float(m[k]))), k
    assert m["response_length"] > 0
    assert not torch.equal(before, policy_3b.model.get_output_embeddings().weight[:64])  # the head trained
