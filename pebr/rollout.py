"""Rollouts: P prompts (each with its image) -> P groups of n sampled responses.

    ro = generate_rollouts(policy, items, n=8, temperature=1.0, top_p=1.0, max_new_tokens=96)
    ro.texts[i]            # response i (rows i*n .. i*n+n-1 belong to prompt i)
    ro.sequences           # [P*n, L+R] prompt (left-padded) + response (padded after its end)

transformers `generate` with a KV cache. The image is encoded once per prompt: the vision tower
runs on the P prompts and its output reaches the P*n rows through `mm_encoder_outputs`.
"""
from __future__ import annotations

import dataclasses

import torch

from pebr.logprobs import encoder_outputs, image_features
from pebr.policy import Policy, PromptBatch


@dataclasses.dataclass
class Rollouts:
    """P groups of n responses; row r belongs to prompt r // n."""

    items: list  # the P TaskItems
    group_size: int  # n
    prompt: PromptBatch  # the P prompts
    sequences: torch.Tensor  # [P*n, L+R]
    attention_mask: torch.Tensor  # [P*n, L+R]: prompt mask, then response mask
    response_mask: torch.Tensor  # [P*n, R] float: 1 up to and including the end-of-turn token
    texts: list[str]  # P*n decoded responses (special tokens removed)
    num_tokens: list[int]  # P*n response lengths in tokens
    truncated: list[bool]  # P*n: hit max_new_tokens without an end-of-turn token

    @property
    def prompt_len(self) -> int:
        return self.prompt.input_ids.shape[1]

    def item_of(self, row: int):
        return self.items[row // self.group_size]

    def select_groups(self, groups: list[int]) -> "Rollouts":
        """The rollouts of these prompt indices only (groups stay whole)."""
        n = self.group_size
        rows = [g * n + j for g in groups for j in range(n)]
        idx = torch.tensor(rows, dtype=torch.long)
        p = self.prompt
        pix_rows = _pixel_rows(p.image_grid_thw, groups)
        return Rollouts(
            items=[self.items[g] for g in groups],
            group_size=n,
            prompt=PromptBatch(
                input_ids=p.input_ids[groups],
                attention_mask=p.attention_mask[groups],
                mm_token_type_ids=p.mm_token_type_ids[groups],
                pixel_values=p.pixel_values[pix_rows],
                image_grid_thw=p.image_grid_thw[groups],
            ),
            sequences=self.sequences[idx],
            attention_mask=self.attention_mask[idx],
            response_mask=self.response_mask[idx],
            texts=[self.texts[r] for r in rows],
            num_tokens=[self.num_tokens[r] for r in rows],
            truncated=[self.truncated[r] for r in rows],
        )


def _pixel_rows(grid_thw: torch.Tensor, groups: list[int]) -> torch.Tensor:
    # pixel_values rows of each image: image i owns prod(grid_thw[i]) consecutive rows.
    sizes = grid_thw.prod(-1)
    starts = torch.cumsum(sizes, 0) - sizes
    return torch.cat([torch.arange(int(starts[g]), int(starts[g] + sizes[g])) for g in groups])


def response_mask_from(responses: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, list[bool]]:
    """responses: [B, R] generated ids -> (mask [B, R] float: 1 up to and including the first eos,
    truncated: B bools, True where no eos was generated)."""
    is_eos = torch.zeros_like(responses, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= responses == e
    # Tokens after the first eos: at least one eos strictly before them.
    after = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) > 0
    return (~after).float(), (~is_eos.any(dim=1)).tolist()


@torch.no_grad()
def generate_rollouts(
    policy: Policy,
    items: list,
    *,
    n: int,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
) -> Rollouts:
    """P items -> Rollouts of P*n responses. temperature 0: greedy (then n should be 1)."""
    if not items:
        raise ValueError("items must hold at least one item")
    model = policy.model
    was_training = model.training
    model.eval()
    prompt = policy.encode_prompts([it.image for it in items], [it.problem for it in items]).to(policy.device)
    feats = image_features(model, prompt.pixel_values, prompt.image_grid_thw)
    rep = lambda x: x.repeat_interleave(n, 0)  # noqa: E731
    sample = temperature > 0
    kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else dict(do_sample=False)
    out = model.generate(
        input_ids=rep(prompt.input_ids),
        attention_mask=rep(prompt.attention_mask),
        image_grid_thw=rep(prompt.image_grid_thw),
        mm_token_type_ids=rep(prompt.mm_token_type_ids),
        mm_encoder_outputs=encoder_outputs(feats, n),
        max_new_tokens=max_new_tokens,
        eos_token_id=policy.eos_ids,
        pad_token_id=policy.pad_id,
        use_cache=True,
        suppress_tokens=policy.vision_token_ids,  # an <|image_pad|> in a response would be read as an image slot
        **kwargs,
    )
    model.train(was_training)
    L = prompt.input_ids.shape[1]
    responses = out[:, L:]
    if responses.shape[1] == 0:  # nothing generated (max_new_tokens reached 0): keep one pad column
        responses = torch.full((out.shape[0], 1), policy.pad_id, dtype=out.dtype, device=out.device)
        out = torch.cat([out, responses], 1)
    mask, truncated = response_mask_from(responses, policy.eos_ids)
    lengths = mask.sum(1).long().tolist()
    texts = policy.tokenizer.batch_decode(
        [r[:k].tolist() for r, k in zip(responses, lengths)], skip_special_tokens=True
    )
    attention = torch.cat([rep(prompt.attention_mask), mask.long()], dim=1)
    return Rollouts(
        items=list(items),
        group_size=n,
        prompt=prompt,
        sequences=out,
        attention_mask=attention,
        response_mask=mask,
        texts=texts,
        num_tokens=lengths,
        truncated=truncated,
    )
