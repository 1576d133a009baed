"""What a rollout is: the data every rollout engine hands back, and the interface it implements."""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from pebr.model.policy import PromptBatch


def group_rows(groups: list[int], n: int) -> list[int]:
    """The rows of these groups (prompt indices) when each prompt has n consecutive rows."""
    return [g * n + j for g in groups for j in range(n)]


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
        rows = group_rows(groups, n)
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
    logprobs: torch.Tensor  # [P*n, R] fp32: log-probs of the sampled response tokens (0 after the end)


class RolloutEngine(Protocol):
    """What generates rollouts (pebr.rollout.factory builds one by name)."""

    def generate(self, prompt: PromptBatch, params: SamplingParams) -> Generation:
        """The P prompts' P*n responses (rows i*n .. i*n+n-1 follow prompt i)."""
        ...

    def update_weights(self, model) -> None:
        """Called after each optimizer step with the policy's model: take its new weights (an engine
        with a copy of its own loads them; one that reads the live model does nothing)."""
        ...
