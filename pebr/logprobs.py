"""Log-probs of responses under the policy, with the image encoded once per prompt.

    feats = image_features(model, pixel_values, grid_thw)               # P tensors [tokens_p, D]
    logp, ent = response_logprobs(model, sequences, attention_mask, prompt_len=L, group_size=n,
                                  image_feats=feats, image_grid_thw=grid_thw, temperature=T,
                                  return_entropy=True)                   # [B, R] fp32 each

Why not `engine.patching.token_logprobs_from_model` as is: it takes `pixel_values` (so a group
of n responses would encode its image n times) and computes all T-1 positions (the prompt's
too). Here the vision tower's output for each prompt is handed to the language model n times
through transformers' `mm_encoder_outputs` (autograd sums the n gradients back into one vision
pass), and only the response positions go through the fused LM-head op
`engine.ops.linear_token_logprobs`.
"""
from __future__ import annotations

import torch

import engine.ops


def image_features(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """pixel_values: [N, C*Tp*P*P], image_grid_thw: [P, 3] -> P tensors [tokens_p, D]: the vision
    tower's merged output per image (differentiable when the tower is)."""
    base = model.model
    out = base.get_image_features(pixel_values.to(base.visual.dtype), image_grid_thw)
    return tuple(out.pooler_output)


def encoder_outputs(feats_per_prompt, group_size: int) -> dict:
    """P per-prompt image features -> transformers' `mm_encoder_outputs` for P*group_size rows
    (row i uses prompt i // group_size; the same tensors, no copy)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    rows = tuple(f for f in feats_per_prompt for _ in range(group_size))
    return {"image": BaseModelOutputWithPooling(pooler_output=rows)}


def response_logprobs(
    model,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    prompt_len: int,
    group_size: int,
    image_feats,
    image_grid_thw: torch.Tensor,
    image_token_id: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """sequences: [B, L+R] (prompt left-padded to L, response after it), attention_mask: [B, L+R],
    image_feats: B/group_size per-prompt features, image_grid_thw: [B/group_size, 3]
    -> logp [B, R] fp32 of sequences[:, L:] (and entropy [B, R]); mask the response padding yourself.
    """
    if sequences.shape[0] != len(image_feats) * group_size:
        raise ValueError(f"sequences has {sequences.shape[0]} rows; expected {len(image_feats)} prompts x {group_size}")
    if not 1 <= prompt_len < sequences.shape[1]:
        raise ValueError(f"prompt_len must be in [1, {sequences.shape[1]}), got {prompt_len}")
    base = model.model
    head = model.get_output_embeddings()
    out = base(
        input_ids=sequences,
        attention_mask=attention_mask,
        image_grid_thw=image_grid_thw.repeat_interleave(group_size, 0),
        mm_token_type_ids=(sequences == image_token_id).to(torch.int32),  # needed for 3D (mrope) positions
        mm_encoder_outputs=encoder_outputs(image_feats, group_size),
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, prompt_len - 1 : -1]  # the states that predict the response tokens
    return engine.ops.linear_token_logprobs(
        hidden,
        head.weight,
        sequences[:, prompt_len:],
        bias=head.bias,
        temperature=temperature,
        return_entropy=return_entropy,
    )
