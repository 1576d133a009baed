"""A Qwen2.5-VL folder written by transformers itself (tiny, random, with a plain byte-level Qwen2
tokenizer: no project-built merges) trains a GRPO step through --model PATH, and the checkpoint
it writes loads back in transformers."""
import os

import torch

from pebr import train
from pebr.run.checkpoint import Checkpointer
from pebr.run.metrics_log import read_metrics


def _transformers_folder(path) -> None:
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    # Qwen's own chat template shape (system turn included): the trainer must take whatever template comes.
    tok.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)  # no preprocessor_config.json: Qwen's defaults apply


def test_transformers_folder_trains_and_reloads(tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model_dir = tmp_path / "qwen_tiny"
    _transformers_folder(model_dir)
    out = tmp_path / "runs"
    train.main(["--stage", "1", "--model", str(model_dir), "--output-dir", str(out), "-n", "2", "--rollout-batch", "1",
                "--micro-batch", "2", "--max-new-tokens", "6", "--sampling-items", "2", "--sampling-k", "2",
                "--split", "all", "--max-steps", "1", "--no-progress", "--lr", "1e-2"])
    (m,) = read_metrics(str(out / "stage1" / "metrics.jsonl"))
    assert m["step"] == 1 and m["skipped"] == 0
    ckpt = Checkpointer(out / "stage1" / "checkpoints").latest()
    assert os.path.isfile(os.path.join(ckpt, "model.safetensors"))
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)
    before = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir)
    AutoTokenizer.from_pretrained(ckpt)
    sd0, sd1 = before.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0), "the step changed no weight"
