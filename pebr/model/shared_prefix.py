"""Log-probs of a group's responses with the group's prompt computed once.

    logp, ent = shared_prefix_logprobs(model, prompt_ids, prompt_mask, responses, response_mask,
                                       group_size=n, image_feats=feats, image_grid_thw=grid,
                                       image_token_id=tid, temperature=T, return_entropy=True)

Every sequence of a GRPO group repeats its prompt (chat template, image tokens, question). The
unshared path (`pebr.model.forward.response_logprobs`) runs the decoder over [P*n, L+R]; here the
decoder runs over the P prompts once ([P, L], keeping their keys and values), then over the
P*n responses ([P*n, R]) attending to their prompt's keys and values. The backward of the
second pass flows into the cache and from there (through `repeat_interleave`) into the one
prompt pass, so the n responses' gradients are summed into it: the same gradient as the
unshared path, for 1/n of the prompt's work.

Exactness (tests/test_shared_prefix.py): the prompt's positions come from the model's own
`get_rope_index` over the prompt (mrope for the image tokens, left padding honoured) and the
responses' continue from the prompt's largest position, which is what `get_rope_index` gives
text after the last vision token; the attention mask is the prompt's (padding included) then
the response's, the same mask the unshared path uses. fp32 results equal the unshared path's to
float rounding (the attention sums run in a different order).

What it needs from the model: a Qwen2-VL / Qwen2.5-VL model from transformers (`model.model` with
`get_rope_index`, `language_model` taking a cache, `mm_encoder_outputs`). `supports(model)` says
whether a model qualifies; the caller falls back to the unshared path otherwise (and under
gradient checkpointing, where transformers turns the cache off).

Memory: the cache of P prompts is repeated to P*n rows (the attention concatenates past and new
keys anyway, so a view would be copied there); activations of the prompt tokens are held once
per prompt instead of once per response.
"""
from __future__ import annotations

import torch

from pebr.model import hf_compat
from pebr.model.forward import encoder_outputs, head_logprobs


def supports(model) -> str | None:
    """None if `model` can run the shared-prefix path, else why not (one line)."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "get_rope_index") or not hasattr(base, "language_model"):
        return f"{type(model).__name__} is not a Qwen2-VL / Qwen2.5-VL model (no get_rope_index)"
    if hf_compat.cache_kwarg(base.language_model) is None:
        return f"{type(base.language_model).__name__}.forward takes no `cache` / `past_key_values`"
    if hf_compat.is_activation_checkpointing(model) and model.training:
        return "gradient checkpointing turns the decoder's cache off"
    return None


def prompt_positions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, image_grid_thw: torch.Tensor,
                     image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt_ids, prompt_mask: [P, L] -> (position ids [3, P, L], next position [P]): the model's own
    rope index of the prompts and the position the first response token takes."""
    base = model.model
    pos, _ = base.get_rope_index(
        prompt_ids,
        mm_token_type_ids=(prompt_ids == image_token_id).to(torch.int32),
        image_grid_thw=image_grid_thw,
        attention_mask=prompt_mask,
    )
    # Padding positions hold a placeholder; the next text position follows the largest real one.
    real = prompt_mask.bool().unsqueeze(0).expand_as(pos)
    nxt = torch.where(real, pos, torch.full_like(pos, -1)).amax(dim=(0, 2)) + 1
    return pos, nxt


def shared_prefix_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_size: int,
    image_feats,
    image_grid_thw: torch.Tensor,
    image_token_id: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
    images_per_prompt=None,
):
    """prompt_ids, prompt_mask: [P, L] (left-padded); responses, response_mask: [P*n, R] (row r
    answers prompt r // n; mask 1 on real tokens, 0 on the padding after the end);
    image_feats: the I per-image vision features of the P prompts; image_grid_thw: [I, 3]
    -> logp [P*n, R] fp32 of `responses` (and entropy [P*n, R]); mask the padding yourself."""
    P, L = prompt_ids.shape
    n = int(group_size)
    if responses.shape[0] != P * n:
        raise ValueError(f"responses has {responses.shape[0]} rows; expected {P} prompts x {n}")
    if responses.shape[1] < 1:
        raise ValueError("responses must hold at least one token per row")
    base = model.model
    lm = base.language_model
    key = hf_compat.cache_kwarg(lm)

    pos, nxt = prompt_positions(model, prompt_ids, prompt_mask, image_grid_thw, image_token_id)
    prefix = base(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=pos,
        mm_encoder_outputs=encoder_outputs(image_feats, 1, images_per_prompt),
        use_cache=True,
    )
    cache = hf_compat.repeat_cache(hf_compat.output_cache(prefix, model), n)

    R = responses.shape[1]
    start = nxt.repeat_interleave(n).unsqueeze(1)  # [P*n, 1]
    resp_pos = (start + torch.arange(R, device=responses.device)).unsqueeze(0).expand(3, -1, -1)
    mask = torch.cat([prompt_mask.repeat_interleave(n, 0), response_mask.to(prompt_mask.dtype)], dim=1)
    out = lm(
        input_ids=responses,
        attention_mask=mask,
        position_ids=resp_pos,
        use_cache=True,
        **{key: cache},
    )
    # The state predicting response token 0 is the prompt's last; token k's is response token k-1's.
    last = prefix.last_hidden_state[:, -1:].repeat_interleave(n, 0)
    hidden = torch.cat([last, out.last_hidden_state[:, :-1]], dim=1)
    return head_logprobs(model, hidden, responses, temperature=temperature, return_entropy=return_entropy)
