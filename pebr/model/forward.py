"""Log-probs of responses under the policy, with each image encoded once per prompt.

    feats = image_features(model, pixel_values, grid_thw)               # I tensors [tokens_i, D]
    logp, ent = response_logprobs(model, sequences, attention_mask, prompt_len=L, group_size=n,
                                  image_feats=feats, image_grid_thw=grid_thw, temperature=T,
                                  images_per_prompt=counts, return_entropy=True)  # [B, R] fp32 each

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
    """pixel_values: [N, C*Tp*P*P], image_grid_thw: [I, 3] -> I tensors [tokens_i, D]: the vision
    tower's merged output per image (differentiable when the tower is)."""
    base = model.model
    out = base.get_image_features(pixel_values.to(base.visual.dtype), image_grid_thw)
    return tuple(out.pooler_output)


def _prompt_spans(num_images: int, images_per_prompt) -> list[tuple[int, int]]:
    """(first image, image count) of each prompt; images_per_prompt None: one image per prompt."""
    if isinstance(images_per_prompt, torch.Tensor):
        images_per_prompt = images_per_prompt.tolist()  # one device sync, not one per prompt
    counts = [1] * num_images if images_per_prompt is None else [int(c) for c in images_per_prompt]
    if sum(counts) != num_images:
        raise ValueError(f"images_per_prompt sums to {sum(counts)}; there are {num_images} images")
    spans, first = [], 0
    for c in counts:
        spans.append((first, c))
        first += c
    return spans


def encoder_outputs(feats, group_size: int, images_per_prompt=None) -> dict:
    """I per-image features of P prompts (prompt p owns images_per_prompt[p] consecutive ones;
    default one each) -> transformers' `mm_encoder_outputs` for P*group_size rows: row i gets
    prompt i // group_size's images in order (the same tensors, no copy)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    spans = _prompt_spans(len(feats), images_per_prompt)
    rows = tuple(f for s, c in spans for _ in range(group_size) for f in feats[s : s + c])
    return {"image": BaseModelOutputWithPooling(pooler_output=rows)}


def rows_image_grid(image_grid_thw: torch.Tensor, group_size: int, images_per_prompt=None) -> torch.Tensor:
    """image_grid_thw: [I, 3] of P prompts -> [I*group_size, 3]: each prompt's block of rows
    repeated group_size times, the order `encoder_outputs` gives the features in (with one image
    per prompt this is repeat_interleave)."""
    spans = _prompt_spans(image_grid_thw.shape[0], images_per_prompt)
    if all(c == 1 for _, c in spans):
        return image_grid_thw.repeat_interleave(group_size, 0)
    return torch.cat([image_grid_thw[s : s + c].repeat(group_size, 1) for s, c in spans])


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
    images_per_prompt=None,
):
    """sequences: [B, L+R] (prompt left-padded to L, response after it), attention_mask: [B, L+R],
    image_feats: I per-image features of the P = B/group_size prompts, image_grid_thw: [I, 3],
    images_per_prompt: [P] (default: one image per prompt, I = P)
    -> logp [B, R] fp32 of sequences[:, L:] (and entropy [B, R]); mask the response padding yourself.
    """
    prompts = len(image_feats) if images_per_prompt is None else len(images_per_prompt)
    if sequences.shape[0] != prompts * group_size:
        raise ValueError(f"sequences has {sequences.shape[0]} rows; expected {prompts} prompts x {group_size}")
    if not 1 <= prompt_len < sequences.shape[1]:
        raise ValueError(f"prompt_len must be in [1, {sequences.shape[1]}), got {prompt_len}")
    base = model.model
    out = base(
        input_ids=sequences,
        attention_mask=attention_mask,
        image_grid_thw=rows_image_grid(image_grid_thw, group_size, images_per_prompt),
        mm_token_type_ids=(sequences == image_token_id).to(torch.int32),  # needed for 3D (mrope) positions
        mm_encoder_outputs=encoder_outputs(image_feats, group_size, images_per_prompt),
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, prompt_len - 1 : -1]  # the states that predict the response tokens
    return head_logprobs(model, hidden, sequences[:, prompt_len:], temperature=temperature, return_entropy=return_entropy)


def head_logprobs(model, hidden: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0,
                  return_entropy: bool = False):
    """hidden: [B, R, H] states that predict ids: [B, R] -> logp [B, R] fp32 (and entropy) through
    the model's LM head, fused (`engine.ops.linear_token_logprobs`: never [B*R, V] logits at once)."""
    head = model.get_output_embeddings()
    return engine.ops.linear_token_logprobs(hidden, head.weight, ids, bias=head.bias, temperature=temperature,
                                            return_entropy=return_entropy)
