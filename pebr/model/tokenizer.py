"""A byte-level BPE `Qwen2Tokenizer` built here, offline, for the tiny default policy.

    tok = build_tokenizer(corpus=texts, vocab_size=768)   # a transformers Qwen2Tokenizer
    tok.save_pretrained(folder)                           # reloads with AutoTokenizer

The pre-tokenizer, byte alphabet, decoder and special tokens are Qwen2's own, so the folder is an
ordinary Qwen2 tokenizer; only the merges are learned from `corpus` (the procedural tasks'
prompts and reference responses), which keeps the tiny policy's responses short: about one
token per word instead of one per byte. No hub file is read.
"""
from __future__ import annotations

import json
from collections.abc import Iterable

# Qwen2.5-VL's special tokens, in Qwen's order (ids right after the learned vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL's chat template, reduced to what this project sends: text and image parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Always in the corpus, so the section headers and the chat scaffolding merge whatever the tasks are.
_BASE_CORPUS = (
    "### Image Description:\n### Rationales:\n### Let's think step by step.\n### Step 1:\n### Step 2:\n"
    "### Step 3:\n### The final answer is:\nsystem\nuser\nassistant\nYou are a helpful assistant.\n"
)


def _bytes_only_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    return Qwen2Tokenizer(vocab=vocab, merges=[])


def build_tokenizer(*, corpus: Iterable[str] = (), vocab_size: int = 768, min_frequency: int = 2):
    """-> a `transformers.Qwen2Tokenizer`: 256 byte tokens + merges learned from `corpus` (up to
    `vocab_size` tokens in all) + `SPECIAL_TOKENS`, with `CHAT_TEMPLATE`; eos = pad = <|im_end|>/<|endoftext|>.

    Deterministic for a given corpus (the BPE trainer breaks ties by byte order).
    """
    from tokenizers import Tokenizer, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the byte alphabet), got {vocab_size}")
    qwen = _bytes_only_tokenizer()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = qwen._tokenizer.pre_tokenizer  # Qwen2's regex split + byte-level mapping
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    bpe.train_from_iterator([_BASE_CORPUS, *corpus], trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]})
    tok.add_tokens([t for t in ("<|endoftext|>", "<|im_end|>")], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"  # batched VLM generation and training need left padding (docs/measured.md)
    return tok


def special_ids(tokenizer) -> dict[str, int]:
    """name -> id of each of `SPECIAL_TOKENS` in `tokenizer` (raises ValueError naming a missing one)."""
    out = {}
    for t in SPECIAL_TOKENS:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {t} token; a Qwen2-VL tokenizer is expected")
        out[t] = i
    return out
