"""A head tied to the input embedding (pebr/model/tied_embedding.py): the same gradient as autograd's
two dense [V, H] terms, padding rows skipped as nn.Embedding skips them, one dense gradient alive."""
import pytest
import torch

from pebr.data.tasks import generate_items, task_corpus
from pebr.model.forward import image_features, response_logprobs
from pebr.model.policy import Policy, tiny_config
from pebr.model.tied_embedding import install_tied_embedding_grad


@pytest.fixture(scope="module")
def tied_parts():
    from pebr.model.image_encoder import ImageEncoder
    from pebr.model.tokenizer import build_tokenizer

    tok = build_tokenizer(corpus=task_corpus(), vocab_size=768)
    cfg = tiny_config(tok)
    cfg.tie_word_embeddings = True
    return tok, cfg, ImageEncoder(min_pixels=56 * 56, max_pixels=112 * 112)


def _model(cfg, seed: int, hooked: bool):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from engine.patching import patch_model

    torch.manual_seed(seed)
    model = patch_model(Qwen2_5_VLForConditionalGeneration(cfg))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if hooked:
        assert install_tied_embedding_grad(model)
    return model


def _grad(model, tok, images, micro_batches: int = 1):
    """The tied weight's gradient of a log-prob loss over random responses (with padding ids in them)."""
    policy = Policy(model=model, tokenizer=tok, images=images)
    items = generate_items(2, seed=3)
    prompt = policy.encode_items(items)
    g = torch.Generator().manual_seed(4)
    for _ in range(micro_batches):
        resp = torch.randint(0, len(tok), (2, 7), generator=g)
        resp[0, -2:] = tok.pad_token_id  # the padding row must get nothing from the embedding
        seq = torch.cat([prompt.input_ids, resp], 1)
        att = torch.cat([prompt.attention_mask, torch.ones_like(resp)], 1)
        feats = image_features(model, prompt.pixel_values, prompt.image_grid_thw)
        logp = response_logprobs(model, seq, att, prompt_len=prompt.input_ids.shape[1], group_size=1,
                                 image_feats=feats, image_grid_thw=prompt.image_grid_thw,
                                 image_token_id=policy.image_token_id)
        (logp * torch.randn(logp.shape, generator=g)).sum().backward()
    return model.get_input_embeddings().weight.grad


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_tied_gradient_equals_autograds(tied_parts, micro_batches, monkeypatch):
    from pebr.model import tied_embedding

    tok, cfg, images = tied_parts
    calls = []
    backward = tied_embedding._RowsIntoWeightGrad.backward
    monkeypatch.setattr(tied_embedding._RowsIntoWeightGrad, "backward",
                        staticmethod(lambda ctx, g: calls.append(1) or backward(ctx, g)))
    ours = _grad(_model(cfg, 0, hooked=True), tok, images, micro_batches)
    assert len(calls) == micro_batches  # the rows went in through the hook, not autograd's dense term
    plain = _grad(_model(cfg, 0, hooked=False), tok, images, micro_batches)
    scale = float(plain.abs().max())
    assert scale > 0
    # the same two terms summed in another order: fp32 rounding of the largest entry
    assert float((ours - plain).abs().max()) <= 1e-6 * scale
    assert float(ours[tok.pad_token_id].abs().max()) == float(plain[tok.pad_token_id].abs().max())


def test_untied_frozen_and_no_grad_are_left_alone(tied_parts):
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok, cfg, images = tied_parts
    untied = Qwen2_5_VLForConditionalGeneration(tiny_config(tok))
    assert not install_tied_embedding_grad(untied)  # nothing to do: two weights, two gradients
    model = _model(cfg, 0, hooked=True)
    assert not install_tied_embedding_grad(model)  # installed once
    emb = model.get_input_embeddings()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert emb(ids).grad_fn is None
    model.requires_grad_(False)
    assert emb(ids).grad_fn is None
    model.requires_grad_(True)
    assert type(emb(ids).grad_fn).__name__ == "_RowsIntoWeightGradBackward"
