"""The CLIP term of the perception reward: a tiny CLIP/SigLIP built offline, scored as the paper does
(split from tests/test_rewards.py, which covers the other reward terms)."""
import math

import numpy as np
import pytest
import torch

from pebr import rewards as R
from pebr.data.scenes import COLOURS, SHAPES
from pebr.data.tasks import generate_items
from test_rewards import PAPER_RESPONSE, _with_description


def _save_tiny_contrastive(folder: str, family: str) -> None:
    """A tiny random CLIP or SigLIP + a word-level tokenizer + its Pil image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast, SiglipConfig,
                              SiglipImageProcessorPil, SiglipModel)

    words = ["[PAD]", "[UNK]", "[EOS]"] + sorted(set(COLOURS) | set(SHAPES) | {"a", "the", "with", "digit", "and"})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]").save_pretrained(folder)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56,
                  patch_size=14)
    torch.manual_seed(0)
    if family == "clip":
        config = CLIPConfig(text_config=dict(text, eos_token_id=2, pad_token_id=0), vision_config=vision, projection_dim=16)
        CLIPModel(config).save_pretrained(folder)
        CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(folder)
    else:
        SiglipModel(SiglipConfig(text_config=dict(text, projection_size=32), vision_config=vision)).save_pretrained(folder)
        SiglipImageProcessorPil(size={"height": 56, "width": 56}).save_pretrained(folder)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_clip"))
    _save_tiny_contrastive(folder, "clip")
    return folder


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_clip_reward_matches_direct_computation(tmp_path, family):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    folder = str(tmp_path)
    _save_tiny_contrastive(folder, family)
    item = generate_items(1, seed=4, kind="perception")[0]
    image = item.image.resize((150, 112))  # not square: exercises resize/crop
    scorer = R.ClipScorer.from_pretrained(folder)
    # Independent path: transformers' own Pil processor and the model's forward outputs.
    model = AutoModel.from_pretrained(folder).eval()
    pixels = AutoImageProcessor.from_pretrained(folder, backend="pil")(image, return_tensors="pt")["pixel_values"]
    text = R.extract_description(item.reference_response)
    pad = dict(padding="max_length", max_length=32) if family == "siglip" else dict(padding=True)
    ids = AutoTokenizer.from_pretrained(folder)([text], return_tensors="pt", **pad)
    with torch.no_grad():
        kw = {} if family == "siglip" else {"attention_mask": ids["attention_mask"]}
        out = model(input_ids=ids["input_ids"], pixel_values=pixels, **kw)
    cos = torch.nn.functional.cosine_similarity(out.text_embeds, out.image_embeds).item()
    assert np.allclose(scorer.similarity([text], [image]), [cos], atol=1e-4)
    resp = item.reference_response
    assert R.clip_reward(resp, image, scorer) == pytest.approx(min(1, max(0, cos / 0.4)), abs=1e-4)


def test_clip_reward_and_failures(clip_folder):
    item = generate_items(1, seed=4, kind="perception")[0]
    scorer = R.ClipScorer.from_pretrained(clip_folder)
    responses = [item.reference_response, "no description", None, _with_description("a purple square")]
    f = R.RewardFailures()
    scores = [R.clip_reward(r, item.image, scorer, failures=f) for r in responses]
    for r, s in zip(responses[::3], scores[::3]):  # the described ones: min(1, cos/0.4) of the description
        cos = scorer.similarity([R.extract_description(r)], [item.image])[0]
        assert s == pytest.approx(R.clip_score_to_reward(cos), abs=1e-6)
    assert scores[1] == 0.0 and scores[2] == 0.0 and all(0.0 <= s <= 1.0 for s in scores)
    assert f.no_description == 1 and f.not_text == 1 and f.total() == 2
    out = R.perception_reward(item.reference_response, item, num_tokens=10, scorer=scorer)
    assert set(out) == {"clip", "keyword", "format", "length", "overall"}
    assert out["overall"] == pytest.approx(0.4 * out["clip"] + 0.4 + 0.1 + 0.1)


def test_clip_scorer_error_is_zero_and_counted():
    class Broken:
        def similarity(self, texts, images):
            raise RuntimeError("boom")

    f = R.RewardFailures()
    assert R.clip_reward(PAPER_RESPONSE, None, Broken(), failures=f) == 0.0
    assert f.scorer_error == 1


@pytest.mark.parametrize("cos, expected", [(0.2, 0.5), (0.4, 1.0), (0.9, 1.0), (-0.3, 0.0), (float("nan"), 0.0)])
def test_clip_scale(cos, expected):
    assert R.clip_score_to_reward(cos) == pytest.approx(expected)


def test_clip_scorer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder"):
        R.ClipScorer.from_pretrained(str(tmp_path / "nope"))
    assert math.isfinite(R.GRADE_TIMEOUT_S)


def test_image_encoded_once_per_group(clip_folder):
    item = generate_items(1, seed=4, kind="perception")[0]
    scorer = R.ClipScorer.from_pretrained(clip_folder)
    calls = []
    inner = scorer.model.get_image_features
    scorer.model.get_image_features = lambda **kw: calls.append(1) or inner(**kw)
    first = [R.clip_reward(item.reference_response, item.image, scorer) for _ in range(4)]
    assert len(calls) == 1 and len(set(first)) == 1
    other = generate_items(2, seed=4, kind="perception")[1]
    R.clip_reward(other.reference_response, other.image, scorer)
    assert len(calls) == 2
