"""Rollouts: P prompts (each with its images) -> P groups of n sampled responses.

    ro = generate_rollouts(policy, items, n=8, temperature=1.0, top_p=1.0, max_new_tokens=96)
    ro.texts[i]            # response i (rows i*n .. i*n+n-1 belong to prompt i)
    ro.sequences           # [P*n, L+R] prompt (left-padded) + response (padded after its end)
    ro.logprobs            # [P*n, R] the sampler's log-probs of the sampled tokens

The one interface a rollout engine implements (`RolloutEngine.generate`): prompts with their
images, n and the sampling settings in; token ids, the sampled tokens' log-probs and lengths out.
`HFRollout` is transformers' `generate` with a KV cache; an inference engine (vLLM) can implement
the same method later. Each image is encoded once per prompt: the vision tower runs on the P
prompts' images (one or more each) and its output reaches the P*n rows through
`mm_encoder_outputs`. Under FSDP the engine runs with every parameter gathered for the whole
generation (`pebr.fsdp.gathered`).

The log-probs are of softmax(logits / T) after transformers' suppression of the vision tokens
(`suppress_tokens`), before top-p: what the trainer recomputes, except for the suppressed tokens'
probability mass; `rollout_logp_diff` in the metrics measures the gap.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import torch

from pebr.logprobs import encoder_outputs, image_features, rows_image_grid
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
    logprobs: torch.Tensor | None = None  # [P*n, R] fp32: the sampler's log-probs of the sampled tokens

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
        return Rollouts(
            items=[self.items[g] for g in groups],
            group_size=n,
            prompt=self.prompt.select(groups),  # a prompt's images and pixel rows go with it
            sequences=self.sequences[idx],
            attention_mask=self.attention_mask[idx],
            response_mask=self.response_mask[idx],
            texts=[self.texts[r] for r in rows],
            num_tokens=[self.num_tokens[r] for r in rows],
            truncated=[self.truncated[r] for r in rows],
            logprobs=None if self.logprobs is None else self.logprobs[idx],
        )


def response_mask_from(responses: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, list[bool]]:
    """responses: [B, R] generated ids -> (mask [B, R] float: 1 up to and including the first eos,
    truncated: B bools, True where no eos was generated)."""
    is_eos = torch.zeros_like(responses, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= responses == e
    # Tokens after the first eos: at least one eos strictly before them.
    after = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) > 0
    return (~after).float(), (~is_eos.any(dim=1)).tolist()


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled."""

    n: int  # responses per prompt (the GRPO group)
    temperature: float  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 128


@dataclasses.dataclass
class Generation:
    """What a rollout engine returns for P prompts x n: rows i*n .. i*n+n-1 follow prompt i."""

    sequences: torch.Tensor  # [P*n, L+R]: the prompt (left-padded to L) then the response ids
    logprobs: torch.Tensor  # [P*n, R] fp32: log-probs of the sampled response tokens
    lengths: list[int]  # P*n response lengths in tokens (up to and including the end-of-turn token)


class RolloutEngine(Protocol):
    def generate(self, prompt: PromptBatch, params: SamplingParams) -> Generation: ...


class _RecordLogprobs:
    """A logits processor that keeps the log-probs of the tokens sampled at each step.

    At step t it sees the scores of step t and the ids up to step t-1: it gathers the previous
    step's log-softmax at the token just sampled, so it holds one [B, V] tensor at a time, never
    [B, R, V]. `finish(responses)` adds the last step's.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0
        self.prev: torch.Tensor | None = None
        self.out: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, responses: torch.Tensor) -> torch.Tensor:
        if self.prev is not None and len(self.out) < responses.shape[1]:
            self.out.append(self.prev.gather(1, responses[:, len(self.out) : len(self.out) + 1]).squeeze(1))
        if not self.out:
            return torch.zeros(responses.shape, dtype=torch.float32, device=responses.device)
        lp = torch.stack(self.out, 1)
        return lp[:, : responses.shape[1]]


class HFRollout:
    """RolloutEngine on transformers' `generate`. run(fn, *args): how to call fn(model, *args)
    (the FSDP root's forward under data parallelism; a plain call otherwise)."""

    def __init__(self, policy: Policy, run: Callable | None = None):
        self.policy = policy
        self.run = run or (lambda fn, *a, **k: fn(policy.model, *a, **k))

    @torch.no_grad()
    def generate(self, prompt: PromptBatch, params: SamplingParams) -> Generation:
        from transformers import LogitsProcessorList

        policy, n = self.policy, params.n
        rep = lambda x: x.repeat_interleave(n, 0)  # noqa: E731
        sample = params.temperature > 0
        kwargs = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0) if sample \
            else dict(do_sample=False)
        record = _RecordLogprobs(params.temperature)

        def _generate(model):
            feats = image_features(model, prompt.pixel_values, prompt.image_grid_thw)
            counts = prompt.images_per_prompt
            return model.generate(
                input_ids=rep(prompt.input_ids),
                attention_mask=rep(prompt.attention_mask),
                image_grid_thw=rows_image_grid(prompt.image_grid_thw, n, counts),
                mm_token_type_ids=rep(prompt.mm_token_type_ids),
                mm_encoder_outputs=encoder_outputs(feats, n, counts),
                max_new_tokens=params.max_new_tokens,
                eos_token_id=policy.eos_ids,
                pad_token_id=policy.pad_id,
                use_cache=True,
                suppress_tokens=policy.vision_token_ids,  # an <|image_pad|> in a response would be read as an image slot
                logits_processor=LogitsProcessorList([record]),
                **kwargs,
            )

        out = self.run(_generate)
        L = prompt.input_ids.shape[1]
        responses = out[:, L:]
        if responses.shape[1] == 0:  # nothing generated (max_new_tokens reached 0): keep one pad column
            responses = torch.full((out.shape[0], 1), policy.pad_id, dtype=out.dtype, device=out.device)
            out = torch.cat([out, responses], 1)
        mask, _ = response_mask_from(responses, policy.eos_ids)
        logprobs = record.finish(responses) * mask
        return Generation(sequences=out, logprobs=logprobs, lengths=mask.sum(1).long().tolist())


@torch.no_grad()
def generate_rollouts(
    policy: Policy,
    items: list,
    *,
    n: int,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    engine: RolloutEngine | None = None,
) -> Rollouts:
    """P items -> Rollouts of P*n responses. temperature 0: greedy (then n should be 1).
    engine: the RolloutEngine (default: HFRollout on the plain policy)."""
    if not items:
        raise ValueError("items must hold at least one item")
    model = policy.model
    was_training = model.training
    model.eval()
    prompt = policy.encode_prompts([item_images(it) for it in items], [it.problem for it in items]).to(policy.device)
    engine = engine or HFRollout(policy)
    gen = engine.generate(prompt, SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens))
    model.train(was_training)
    out = gen.sequences
    L = prompt.input_ids.shape[1]
    responses = out[:, L:]
    mask, truncated = response_mask_from(responses, policy.eos_ids)
    lengths = mask.sum(1).long().tolist()
    texts = policy.tokenizer.batch_decode(
        [r[:k].tolist() for r, k in zip(responses, lengths)], skip_special_tokens=True
    )
    attention = torch.cat([prompt.attention_mask.repeat_interleave(n, 0), mask.long()], dim=1)
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
        logprobs=gen.logprobs.float(),
    )


def item_images(item) -> list:
    """Every image of an item, first one first (TaskItem.images; an item with only `.image` has one)."""
    images = getattr(item, "images", None)
    return list(images) if images is not None else [item.image]
