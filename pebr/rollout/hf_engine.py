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
generation (`pebr.run.fsdp.gathered`).

Shared prefix (`HFRollout(shared_prefix=True)`, the default): the whole prompt (chat template,
image tokens, question) is prefilled once per prompt, not once per response. All but the last
prompt token go through the decoder for the P prompts with a key/value cache; the cache is
repeated to the P*n rows (`batch_repeat_interleave`) and handed to `generate`, which then runs
only the last prompt token and the response tokens. The position ids (mrope for the image
tokens, left padding honoured) come from the model's own generation code over the P prompts and
are repeated, so each row sees the positions the unshared path gives it. Why not all L tokens:
`generate` slices the uncached tokens as `input_ids[:, -(L - cached):]`, which with nothing
uncached is the whole prompt again. A model or transformers version that cannot take a cache
this way runs the unshared path (logged once); the sampled tokens are the same either way, up to
float rounding in the last prompt token's attention.

The log-probs are of softmax(logits / T) over the whole vocabulary, before the vision tokens are
suppressed and before top-p: exactly what the trainer computes for the same policy, so a GRPO
step that makes several updates takes them as its old log-probs instead of running the policy
over the rollouts again (`pebr.trainers.grpo`; `rollout_logp_diff` in the metrics measures the
gap: float rounding, 5e-8 a token on average in fp32 on the tiny default). The vision tokens are
never sampled: the recorder sets their scores to -inf after recording (an <|image_pad|> in a
response would be read as an image slot).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from engine import nvtx
from pebr.model import hf_compat
from pebr.model.forward import encoder_outputs, image_features, rows_image_grid
from pebr.model.policy import Policy, PromptBatch
from pebr.model.shared_prefix import supports as shared_prefix_support
from pebr.rollout.kv_cache import preallocate
from pebr.rollout.types import (
    Generation,
    RolloutEngine,
    Rollouts,
    SamplingParams,
    response_mask_from,
)


class _RecordLogprobs:
    """A logits processor that keeps the log-probs of the tokens sampled at each step, suppresses
    the `suppress` token ids, and (with `sample`) draws the token itself.

    At step t it sees the scores of step t and the ids up to step t-1: it gathers the previous
    step's log-softmax at the token just sampled, so it holds one [B, V] tensor at a time, never
    [B, R, V]. `finish(responses)` adds the last step's. The log-softmax is taken before the
    suppression: the policy's own log-probs, which the trainer recomputes up to float rounding
    (suppressing first would shift every row by log(1 - p(suppressed))).

    sample: return log-softmax(scores / T) plus Gumbel noise, so that `generate`'s greedy argmax
    is a draw from softmax(scores / T) (the Gumbel-max trick) renormalized over the tokens not
    suppressed (a suppressed token gets -inf, so it is never the argmax). On CPU this replaces
    `torch.multinomial`, whose exponential draws were 13% of a tiny rollout's time (one
    `torch.rand` plus two logs cost about a quarter of that); `generate` then also skips its own
    softmax. Only without top-p (top_p = 1): nucleus filtering stays with `generate`.
    """

    def __init__(self, temperature: float, sample: bool = False, suppress: list[int] | None = None):
        self.temperature = temperature if temperature > 0 else 1.0
        self.sample = sample
        self.suppress = sorted(set(int(t) for t in suppress)) if suppress else []
        self._suppress_idx: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None
        self.out: list[torch.Tensor] = []

    def _suppressed(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, V] -> x with the suppressed columns at -inf (x itself when nothing is suppressed)."""
        if not self.suppress:
            return x
        if self._suppress_idx is None or self._suppress_idx.device != x.device:
            idx = torch.tensor(self.suppress, dtype=torch.long, device=x.device)
            self._suppress_idx = idx[idx < x.shape[-1]]  # ids past the vocabulary have no column
        return x.index_fill(-1, self._suppress_idx, float("-inf"))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.sample:
            # -log(u) ~ Exp(1); argmax(logp - log(Exp)) ~ softmax(logp). u = 0 gives -inf: never picked.
            u = torch.rand(self.prev.shape, device=self.prev.device, dtype=self.prev.dtype)
            return self._suppressed(self.prev - torch.log(-torch.log(u)))
        return self._suppressed(scores)

    def finish(self, responses: torch.Tensor) -> torch.Tensor:
        if self.prev is not None and len(self.out) < responses.shape[1]:
            self.out.append(self.prev.gather(1, responses[:, len(self.out) : len(self.out) + 1]).squeeze(1))
        if not self.out:
            return torch.zeros(responses.shape, dtype=torch.float32, device=responses.device)
        lp = torch.stack(self.out, 1)
        return lp[:, : responses.shape[1]]


class HFRollout:
    """RolloutEngine on transformers' `generate`. run(fn, *args): how to call fn(model, *args)
    (the FSDP root's forward under data parallelism; a plain call otherwise). shared_prefix: the
    prompt prefilled once per prompt and its cache repeated to the n responses (off: every row
    prefills its own copy of the prompt; the same tokens, more work). log: where the one line
    saying why the shared prefix is off for a model goes (default: the "pebr" logger)."""

    def __init__(self, policy: Policy, run: Callable | None = None, shared_prefix: bool = True,
                 log: Callable[[str], None] | None = None):
        self.policy = policy
        self.run = run or (lambda fn, *a, **k: fn(policy.model, *a, **k))
        self.shared_prefix = shared_prefix
        self.log = log or logging.getLogger("pebr").warning
        self._logged: set[str] = set()  # reasons already logged (each once)

    @torch.no_grad()
    def generate(self, prompt: PromptBatch, params: SamplingParams) -> Generation:
        from transformers import LogitsProcessorList

        policy, n = self.policy, params.n
        rep = lambda x: x.repeat_interleave(n, 0)  # noqa: E731
        sample = params.temperature > 0
        own_sampling = sample and params.top_p >= 1.0  # the processor draws the tokens (Gumbel-max)
        kwargs = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0) \
            if sample and not own_sampling else dict(do_sample=False)
        # the vision tokens and the head's rows past the tokenizer are never sampled (the recorder
        # suppresses them after taking the log-probs, see _RecordLogprobs and Policy.never_sampled_ids)
        record = _RecordLogprobs(params.temperature, sample=own_sampling, suppress=policy.never_sampled_ids)

        def _generate(model):
            feats = image_features(model, prompt.pixel_values, prompt.image_grid_thw)
            counts = prompt.images_per_prompt
            settings = dict(
                max_new_tokens=params.max_new_tokens,
                eos_token_id=policy.eos_ids,
                pad_token_id=policy.pad_id,
                use_cache=True,
                logits_processor=LogitsProcessorList([record]),
                **kwargs,
            )
            shared = self._shared_prefix_inputs(model, prompt, feats, n, params.max_new_tokens) if self.shared_prefix else None
            if shared is not None:
                return model.generate(**shared, **settings)
            return model.generate(
                input_ids=rep(prompt.input_ids),
                attention_mask=rep(prompt.attention_mask),
                image_grid_thw=rows_image_grid(prompt.image_grid_thw, n, counts),
                mm_token_type_ids=rep(prompt.mm_token_type_ids),
                mm_encoder_outputs=encoder_outputs(feats, n, counts),
                **settings,
            )

        with nvtx.range("generate"):  # the sampler's whole decode, prefill included
            out = self.run(_generate)
        L = prompt.input_ids.shape[1]
        responses = out[:, L:]
        if responses.shape[1] == 0:  # nothing generated (max_new_tokens reached 0): keep one pad column
            responses = torch.full((out.shape[0], 1), policy.pad_id, dtype=out.dtype, device=out.device)
            out = torch.cat([out, responses], 1)
        mask, _ = response_mask_from(responses, policy.eos_ids)
        logprobs = record.finish(responses) * mask
        return Generation(sequences=out, logprobs=logprobs)

    def update_weights(self, model) -> None:
        """Nothing to do: generate runs the live policy, so it always has the latest weights."""

    def _why_not_shared(self, model, prompt: PromptBatch) -> str | None:
        """None if the prompt can be prefilled once and its cache handed to `generate`, else why not."""
        why = shared_prefix_support(model)
        if why is not None:
            return why
        if hf_compat.cache_kwarg(model) is None:
            return f"{type(model).__name__}.forward takes no `cache` / `past_key_values`"
        if not hf_compat.has_generation_positions(model):
            return "this transformers has no _prepare_position_ids_for_generation (the prompts' positions)"
        if hf_compat.generation_cache_implementation(model) is not None:
            return "the generation config names a cache implementation (generate builds its own cache)"
        if prompt.input_ids.shape[1] < 2:
            return "one-token prompts (nothing before the last token to share)"
        # generate runs the last column uncached: every row's last prompt token, a text token.
        if not bool(prompt.attention_mask[:, -1].all()) or bool(prompt.mm_token_type_ids[:, -1].any()):
            return "the prompts' last column is padding or an image token (prompts must be left-padded, text last)"
        return None

    def _shared_prefix_inputs(self, model, prompt: PromptBatch, feats, n: int, extra_tokens: int = 0) -> dict | None:
        """The P prompts' first L-1 tokens through the decoder once -> `generate`'s inputs for the
        P*n rows with that cache (repeated n times per prompt); None (the unshared path) when the
        model or the batch cannot take it (the reason logged once)."""
        why = self._why_not_shared(model, prompt)
        if why is not None:
            if why not in self._logged:
                self._logged.add(why)
                self.log(f"rollouts: shared-prefix prefill off ({why}); every response prefills its prompt")
            return None
        ids, mask, mm = prompt.input_ids, prompt.attention_mask, prompt.mm_token_type_ids
        base = model.model
        # The positions generate gives the unshared rows (text positions + mrope rows), from the
        # model's own code over the P prompts: the same per row, computed once.
        base.rope_deltas = None  # a stale value from an earlier call would be taken as the answer
        pos = hf_compat.generation_positions(model, ids, attention_mask=mask, mm_token_type_ids=mm,
                                             image_grid_thw=prompt.image_grid_thw)
        deltas = getattr(base, "rope_deltas", None)
        if isinstance(deltas, torch.Tensor) and deltas.shape[0] == ids.shape[0]:
            base.rope_deltas = deltas.repeat_interleave(n, 0)  # any later lookup by row sees P*n rows
        prefix = base(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=pos[..., :-1],
            mm_encoder_outputs=encoder_outputs(feats, 1, prompt.images_per_prompt),
            use_cache=True,
        )
        cache = hf_compat.repeat_cache(hf_compat.output_cache(prefix, model), n)
        # decode writes into buffers sized for the whole response instead of torch.cat per step
        # (pebr/rollout/kv_cache.py): the last prompt column plus the response budget
        preallocate(cache, extra_tokens=1 + extra_tokens)
        rep = lambda x: x.repeat_interleave(n, 0)  # noqa: E731
        return {
            "input_ids": rep(ids),  # generate runs only the uncached last column (and the responses)
            "attention_mask": rep(mask),
            "position_ids": pos.repeat_interleave(n, dim=-2),  # [4 or 3, P*n, L] or [P*n, L]
            "mm_token_type_ids": rep(mm),
            hf_compat.cache_kwarg(model): cache,
        }


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
    prompt = policy.encode_items(items).to(policy.device)
    engine = engine or HFRollout(policy)  # pebr.rollout.factory's "hf"
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
