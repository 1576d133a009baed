"""Stage 0: warm-up SFT on reference responses in the structured format (vision tower frozen).

    trainer = SFTTrainer(cfg, policy=policy, items=items, run_dir="runs/stage0")
    trainer.train()

Loss: the token-mean negative log-likelihood of each reference response (and its <|im_end|>)
given the prompt and its images, from `engine.ops.linear_token_logprobs` on the last hidden states.
The loop, checkpoints and data parallelism are pebr.trainers.base.Trainer's: one step is one
`minibatch_step` over the batch's micro-batches, each weighted by its share of the batch's
response tokens counted over every rank.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING

import torch

from engine import nvtx
from pebr.data.order import DataOrder
from pebr.model.forward import image_features, response_logprobs
from pebr.trainers.base import Trainer

if TYPE_CHECKING:  # the type only: trainers sit below the recipe layer (docs/pebr-map.md)
    from pebr.recipe.config import TrainConfig


@dataclasses.dataclass
class SFTBatch:
    """sequences/attention_mask: [B, L+R]; response_mask: [B, R]; prompt_len L;
    pixel_values: [N, C*Tp*P*P]; image_grid_thw: [I, 3]; images_per_prompt: [B] summing to I
    (None: one image per row). Images in row order, as `PromptBatch` holds them."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    images_per_prompt: torch.Tensor | None = None


def make_sft_batch(policy, items) -> SFTBatch:
    """Items with a reference response -> prompt (left-padded) + response + <|im_end|> (right-padded)."""
    prompt = policy.encode_items(items)
    end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    resp = [policy.tokenizer(it.reference_response, add_special_tokens=False).input_ids + [end] for it in items]
    R = max(len(r) for r in resp)
    ids = torch.full((len(items), R), policy.pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), R), dtype=torch.long)
    for i, r in enumerate(resp):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return SFTBatch(
        sequences=torch.cat([prompt.input_ids, ids], 1),
        attention_mask=torch.cat([prompt.attention_mask, mask], 1),
        response_mask=mask.float(),
        prompt_len=prompt.input_ids.shape[1],
        pixel_values=prompt.pixel_values,
        image_grid_thw=prompt.image_grid_thw,
        images_per_prompt=prompt.images_per_prompt,
    )


class SFTTrainer(Trainer):
    desc = "stage 0 SFT"

    def __init__(self, cfg: TrainConfig, *, policy, items, run_dir: str, log=print, metrics_log=None, world=None):
        """cfg: its `sft` and `optimizer` sections, `seed`, `max_steps`, `save_every`; items with
        reference responses."""
        items = [it for it in items if it.reference_response]
        if not items:
            raise ValueError("no item has a reference_response: warm-up SFT needs responses in the structured format")
        self.sft = cfg.sft
        super().__init__(cfg, policy=policy, run_dir=run_dir, world=world, lr=self.sft.lr,
                         warmup_steps=self.sft.warmup_steps, freeze_vision=self.sft.freeze_vision, stage=0,
                         init_model=None, log=log, metrics_log=metrics_log)
        self.items = items
        self.order = DataOrder(len(items), seed=cfg.seed)
        per_epoch = math.ceil(len(items) / self.sft.batch_size)
        self.total_steps = self.sft.epochs * per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

    def progress_postfix(self, metrics: dict) -> dict:
        return {"loss": f"{metrics['loss']:.3f}"}

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        self.policy.model.train()
        W = self.world.world_size
        batch = self.sft.batch_size - self.sft.batch_size % W if self.sft.batch_size >= W else W
        mine = self.world.share(self.order.take(batch), batch)
        items = [self.items[i] for i in mine]
        micro = [items[c : c + self.sft.micro_batch] for c in range(0, len(items), self.sft.micro_batch)]
        batches = [make_sft_batch(self.policy, chunk) for chunk in micro]
        total = float(self.world.sum([sum(float(b.response_mask.sum()) for b in batches)])[0])
        out = self.minibatch_step(batches, total_tokens=max(total, 1.0))
        self.step += 1
        metrics = {"step": self.step, "loss": float(self.world.sum([out.get("nll", 0.0)])[0]) / max(total, 1.0),
                   "grad_norm": out["grad_norm"], "skipped": out["skipped"], "epoch": self.order.epoch}
        metrics.update(self.step_metrics(t0, out.get("tokens", 0.0)))
        return metrics

    def forward_backward_step(self, b: SFTBatch, *, total_tokens: float) -> dict:
        dev = self.policy.device
        grad_vision = not self.sft.freeze_vision

        def fn(model):
            with torch.set_grad_enabled(grad_vision):
                feats = image_features(model, b.pixel_values.to(dev), b.image_grid_thw.to(dev))
            return response_logprobs(
                model, b.sequences.to(dev), b.attention_mask.to(dev), prompt_len=b.prompt_len, group_size=1,
                image_feats=feats, image_grid_thw=b.image_grid_thw.to(dev), image_token_id=self.policy.image_token_id,
                images_per_prompt=b.images_per_prompt,
            )

        with nvtx.range("policy_forward"):
            logp = self.run(fn)
        mask = b.response_mask.to(dev)
        nll = -(logp * mask).sum()
        with nvtx.range("backward"):
            (nll * (self.world.world_size / total_tokens)).backward()
        return {"nll": float(nll.detach()), "tokens": float(mask.sum())}
