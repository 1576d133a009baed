"""Real model widths without a download: a random-init Qwen2.5-VL with the published architecture
of Qwen2.5-VL-3B or -7B (config.json of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct), its depth
cut by flag, and our tokenizer padded to the model's vocabulary.

    policy = build_sized_policy("qwen2.5-vl-3b", text_layers=2, vision_blocks=1)

What does not scale with depth is then at full size: the LM head (2,048 x 151,936 tied for 3B;
3,584 x 152,064 untied for 7B), the vocabulary every log-prob is taken over, the vision tower's
width and its image tokens, the loss, the rollout's log-prob recording. So its memory and time are
the real ones; per-layer cost is measured at a few depths and extrapolated (bench.real_shapes).

The tokenizer is ours (a few hundred BPE tokens) while the vocabulary is the model's: the ids
from len(tokenizer) up to the vocabulary have no text, as the 271 padding rows of Qwen's own
151,936-row head have none. They are never sampled: `Policy.never_sampled_ids` lists them and the
rollout suppresses them after recording the log-probs (pebr/rollout/hf_engine.py).
"""
from __future__ import annotations

import dataclasses

# The vision tower is the same for 3B and 7B (only its merger's output width follows the text width).
QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                        fullatt_block_indexes=[7, 15, 23, 31])


@dataclasses.dataclass(frozen=True)
class RealSize:
    """A published Qwen2.5-VL text architecture."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 1e6
    max_position_embeddings: int = 128000

    def text_config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("tie_word_embeddings", "rope_theta")}


REAL_SIZES = {
    "qwen2.5-vl-3b": RealSize(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-vl-7b": RealSize(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                              num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
# The image side the built-in tasks use at real sizes: 448 x 448 -> 32 x 32 patches -> 256 image tokens.
REAL_IMAGE_SIZE = 448


def real_config(name: str, *, text_layers: int | None = None, vision_blocks: int | None = None, special_ids=None):
    """A Qwen2_5_VLConfig of REAL_SIZES[name] with `text_layers` decoder layers and `vision_blocks`
    vision blocks (None: the model's own 36/28 and 32). special_ids: {token: id} of the tokenizer
    that goes with it (pebr.model.tokenizer.special_ids); None leaves transformers' defaults
    (Qwen's own ids). The full-attention vision blocks kept are those below the cut; when none is,
    the last block is one, so a cut tower still mixes window and full attention as the real one does."""
    from transformers import Qwen2_5_VLConfig

    from pebr.model.policy import mrope_section, token_id_fields

    if name not in REAL_SIZES:
        raise ValueError(f"model size must be one of {', '.join(REAL_SIZES)}, got {name!r}")
    size = REAL_SIZES[name]
    layers = size.num_hidden_layers if text_layers is None else int(text_layers)
    blocks = QWEN25_VL_VISION["depth"] if vision_blocks is None else int(vision_blocks)
    if layers < 1 or blocks < 1:
        raise ValueError(f"text_layers and vision_blocks must be >= 1, got {layers} and {blocks}")
    full = [i for i in QWEN25_VL_VISION["fullatt_block_indexes"] if i < blocks] or [blocks - 1]
    text = dict(size.text_config(), num_hidden_layers=layers, tie_word_embeddings=size.tie_word_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta,
                                 "mrope_section": mrope_section(size.hidden_size // size.num_attention_heads)})
    vision = dict(QWEN25_VL_VISION, depth=blocks, fullatt_block_indexes=full, out_hidden_size=size.hidden_size)
    ids = {}
    if special_ids is not None:
        text_ids, ids = token_id_fields(special_ids)
        text.update(text_ids)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=size.tie_word_embeddings, **ids)


def build_sized_policy(name: str, *, text_layers: int | None = 2, vision_blocks: int | None = 1, seed: int = 0,
                       corpus=None, image_size: int = REAL_IMAGE_SIZE):
    """A random-init Policy of REAL_SIZES[name], depth cut to `text_layers` and `vision_blocks`, with
    the tiny policy's tokenizer (learned from `corpus`, default the built-in tasks') padded to the
    model's vocabulary; images of up to `image_size` x `image_size` keep their size."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pebr.model.image_encoder import ImageEncoder
    from pebr.model.policy import Policy, use_engine_kernels
    from pebr.model.tokenizer import build_tokenizer, special_ids

    if corpus is None:
        from pebr.data.tasks import task_corpus

        corpus = task_corpus()
    tok = build_tokenizer(corpus=corpus)
    cfg = real_config(name, text_layers=text_layers, vision_blocks=vision_blocks, special_ids=special_ids(tok))
    if len(tok) > cfg.text_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the model's vocabulary {cfg.text_config.vocab_size}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = cfg.text_config.eos_token_id
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    side = image_size * image_size
    images = ImageEncoder(min_pixels=min(56 * 56, side), max_pixels=max(side, 56 * 56))
    return Policy(model=use_engine_kernels(model), tokenizer=tok, images=images)
