"""Tiny models shared by tests: a Qwen2-VL (not 2.5) policy next to the built-in tiny Qwen2.5-VL."""
import pytest
import torch

from pebr.model.policy import Policy


def tiny_qwen2_vl_policy(like: Policy, *, seed: int) -> Policy:
    """A tiny random Qwen2-VL with `like`'s tokenizer, special ids and image preprocessing."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    c = like.model.config
    text = c.text_config
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=text.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
                         bos_token_id=None, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id),
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64),
        image_token_id=c.image_token_id, video_token_id=c.video_token_id,
        vision_start_token_id=c.vision_start_token_id, vision_end_token_id=c.vision_end_token_id,
    )
    torch.manual_seed(seed)
    return Policy(model=Qwen2VLForConditionalGeneration(cfg), tokenizer=like.tokenizer, images=like.images)


def qwen2_fixture(*, seed: int):
    """The module-scoped fixture `qwen2` of a test module that has a `qwen25` fixture (the tiny
    Qwen2.5-VL policy); in the module: `qwen2 = qwen2_fixture(seed=13)`."""

    @pytest.fixture(scope="module", name="qwen2")
    def qwen2(qwen25):
        """A tiny Qwen2-VL (not 2.5) with qwen25's tokenizer and special ids."""
        return tiny_qwen2_vl_policy(qwen25, seed=seed)

    return qwen2
