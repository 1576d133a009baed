"""Stage 0: warm-up SFT on reference responses in the structured format (vision tower frozen).

    trainer = SFTTrainer(cfg, policy=policy, items=items, run_dir="runs/stage0")
    trainer.train()

Loss: the token-mean negative log-likelihood of each reference response (and its <|im_end|>)
given the prompt and image, from `engine.ops.linear_token_logprobs` on the last hidden states.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import torch

from pebr.checkpoint import Checkpointer, DataOrder, load_trainer_state, rng_state, set_rng_state
from pebr.grpo_trainer import build_optimizer, peak_mem_mb, set_vision_trainable
from pebr.logprobs import image_features, response_logprobs
from pebr.policy import left_pad


@dataclasses.dataclass
class SFTBatch:
    """sequences/attention_mask: [B, L+R]; response_mask: [B, R]; prompt_len L."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


def make_sft_batch(policy, items) -> SFTBatch:
    """Items with a reference response -> prompt (left-padded) + response + <|im_end|> (right-padded)."""
    prompt = policy.encode_prompts([it.image for it in items], [it.problem for it in items])
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
    )


class SFTTrainer:
    def __init__(self, cfg, *, policy, items, run_dir: str, log=print, metrics_log=None):
        """cfg: TrainConfig (its `sft` section, `seed`, `max_steps`, `save_every`); items with reference responses."""
        items = [it for it in items if getattr(it, "reference_response", "")]
        if not items:
            raise ValueError("no item has a reference_response: warm-up SFT needs responses in the structured format")
        self.cfg, self.sft, self.policy, self.items, self.log = cfg, cfg.sft, policy, items, log
        self.metrics_log = metrics_log
        set_vision_trainable(policy.model, not self.sft.freeze_vision)
        self.opt, self.sched = build_optimizer(
            policy.model, lr=self.sft.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, warmup_steps=self.sft.warmup_steps
        )
        self.order = DataOrder(len(items), seed=cfg.seed)
        per_epoch = math.ceil(len(items) / self.sft.batch_size)
        self.total_steps = self.sft.epochs * per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.step = 0
        self.ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=cfg.keep_checkpoints)
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {
            "step": self.step, "data_position": self.order.position, "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "rng": rng_state(), "config": self.cfg.to_dict(), "stage": 0,
            "init_model": None,
        }

    def resume_from(self, path: str) -> None:
        state = load_trainer_state(path)
        self.step, self.order.position = int(state["step"]), int(state["data_position"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if self.metrics_log is not None:
            self.metrics_log.truncate_after(self.step)
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> str:
        return self.ckpt.save(self.step, self.policy, self.state_dict())

    def train(self) -> list[dict]:
        bar = None
        if self.cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="stage 0 SFT", unit="step")
        while self.step < self.total_steps:
            m = self.train_step()
            self.history.append(m)
            if self.metrics_log is not None:
                self.metrics_log.append(m)
            if self.step % self.cfg.save_every == 0 or self.step == self.total_steps:
                self.save()
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.3f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        return self.history

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        model = self.policy.model
        model.train()
        items = [self.items[i] for i in self.order.take(self.sft.batch_size)]
        total_tokens = sum(len(self.policy.tokenizer(it.reference_response).input_ids) + 1 for it in items)
        self.opt.zero_grad(set_to_none=True)
        loss_sum, tokens = 0.0, 0.0
        for c0 in range(0, len(items), self.sft.micro_batch):
            b = make_sft_batch(self.policy, items[c0 : c0 + self.sft.micro_batch])
            dev = self.policy.device
            with torch.set_grad_enabled(not self.sft.freeze_vision):
                feats = image_features(model, b.pixel_values.to(dev), b.image_grid_thw.to(dev))
            logp = response_logprobs(
                model, b.sequences.to(dev), b.attention_mask.to(dev), prompt_len=b.prompt_len, group_size=1,
                image_feats=feats, image_grid_thw=b.image_grid_thw.to(dev), image_token_id=self.policy.image_token_id,
            )
            mask = b.response_mask.to(dev)
            nll = -(logp * mask).sum()
            (nll / total_tokens).backward()
            loss_sum += float(nll.detach())
            tokens += float(mask.sum())
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        skipped = 0
        if torch.isfinite(norm):
            self.opt.step()
            self.sched.step()
        else:
            skipped = 1
            self.log(f"SFT step {self.step + 1}: gradient norm is {float(norm)}; update skipped")
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        return {
            "step": self.step, "loss": loss_sum / max(tokens, 1.0), "grad_norm": float(norm), "skipped": skipped,
            "lr": self.sched.get_last_lr()[0], "tokens_per_s": tokens / dt, "step_time_s": dt,
            "peak_mem_mb": peak_mem_mb(self.policy.device), "epoch": self.order.epoch,
        }
