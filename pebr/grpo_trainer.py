"""GRPO on the engine's ops: the perception (stage 1) and reasoning (stage 2) trainer.

    trainer = GRPOTrainer(cfg, policy=policy, reference=frozen_copy, items=items,
                          reward_fn=fn, run_dir="runs/stage1", init_model="runs/stage0/...")
    trainer.train()        # train_step() -> rollout() / score() / update(); checkpoints + metrics here only

One step: take `rollout_batch` prompts in the data order; `rollout` samples n responses each
(groups stay together, the image is encoded once per prompt); `score` runs the stage's reward;
`engine.ops.group_advantages` normalizes within each group; `update` splits the groups into
mini-batches (one AdamW step each) and micro-batches (gradient accumulation), computing
log-probs through `engine.ops.linear_token_logprobs` on the last hidden states and the loss with
`engine.ops.grpo_loss`.

Departures from EasyR1, and why:
- old log-probs are not recomputed when there is one update per rollout (rollout_batch ==
  mini_batch and ppo_epochs == 1): they equal the current ones, and grpo_loss uses logp.detach().
- reference log-probs are computed per micro-batch just before the policy's forward (no pass
  over the whole batch first), which is the same numbers with less memory held.
- a step whose gradient norm is not finite is skipped (no optimizer step) and logged.
"""
from __future__ import annotations

import math
import os
import resource
import time

import torch

from pebr.checkpoint import Checkpointer, DataOrder, load_trainer_state, rng_state, set_rng_state
from pebr.logprobs import image_features, response_logprobs
from pebr.rollout import Rollouts, generate_rollouts


def build_optimizer(model, *, lr: float, weight_decay: float, betas=(0.9, 0.999), warmup_steps: int = 0):
    """AdamW on the trainable parameters + constant LR after a linear warm-up -> (optimizer, scheduler)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    warm = max(0, int(warmup_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


def set_vision_trainable(model, trainable: bool) -> None:
    """Freeze or unfreeze the vision tower (model.model.visual)."""
    for p in model.model.visual.parameters():
        p.requires_grad_(trainable)


def peak_mem_mb(device: torch.device) -> float:
    """CUDA: max_memory_allocated; CPU: the process's RSS high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp_min(1))


class GRPOTrainer:
    def __init__(
        self,
        cfg,
        *,
        policy,
        reference,
        items: list,
        reward_fn,
        run_dir: str,
        init_model: str | None,
        log=print,
        metrics_log=None,
    ):
        """cfg: TrainConfig; policy: the Policy trained in place; reference: a frozen Policy (or None
        when kl_coef == 0); reward_fn(text, item, num_tokens) -> dict with "overall";
        metrics_log: a `pebr.metrics_log.MetricsLog` (one line per step)."""
        import engine.ops

        self.cfg, self.policy, self.reference, self.items = cfg, policy, reference, list(items)
        self.reward_fn, self.run_dir, self.init_model, self.log = reward_fn, run_dir, init_model, log
        self.metrics_log = metrics_log
        self.ops = engine.ops
        self.device = policy.device
        set_vision_trainable(policy.model, not cfg.freeze_vision)
        self.opt, self.sched = build_optimizer(
            policy.model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, warmup_steps=cfg.warmup_steps
        )
        self.order = DataOrder(len(self.items), seed=cfg.seed)
        self.step = 0
        steps_per_epoch = max(1, len(self.items) // cfg.rollout_batch)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
        self.ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=cfg.keep_checkpoints)
        self.history: list[dict] = []
        self.nonfinite_rewards = 0

    # ---- state

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "data_position": self.order.position,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "init_model": self.init_model,
            "stage": self.cfg.stage,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.order.position = int(state["data_position"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])

    def resume_from(self, path: str) -> None:
        self.load_state_dict(load_trainer_state(path))
        if self.metrics_log is not None:
            self.metrics_log.truncate_after(self.step)
        self.log(f"resumed from {path} at step {self.step} (data position {self.order.position})")

    def save(self) -> str:
        return self.ckpt.save(self.step, self.policy, self.state_dict())

    # ---- the loop

    def train(self) -> list[dict]:
        """Run until `total_steps`; checkpoint every `save_every` steps and at the end."""
        cfg = self.cfg
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"stage {cfg.stage} GRPO", unit="step")
        while self.step < self.total_steps:
            metrics = self.train_step()
            self.history.append(metrics)
            if self.metrics_log is not None:
                self.metrics_log.append(metrics)
            if self.step % cfg.save_every == 0 or self.step == self.total_steps:
                self.save()
            if bar is not None:
                recent = [m["reward/overall"] for m in self.history[-10:]]
                bar.set_postfix(reward=f"{sum(recent) / len(recent):.3f}", acc=f"{metrics['accuracy']:.2f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        return self.history

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        idx = self.order.take(cfg.rollout_batch)
        ro = self.rollout([self.items[i] for i in idx])
        t_roll = time.perf_counter() - t0
        self.nonfinite_rewards = 0
        rewards, components, accuracy = self.score(ro)
        metrics = {"step": self.step + 1, "epoch": self.order.epoch, "data_position": self.order.position}
        metrics["reward/overall"] = float(rewards.mean())
        for name, vals in components.items():
            metrics[f"reward/{name}"] = sum(vals) / len(vals)
        metrics["accuracy"] = sum(accuracy) / len(accuracy)
        metrics["response_length"] = sum(ro.num_tokens) / len(ro.num_tokens)
        metrics["truncated"] = sum(ro.truncated) / len(ro.truncated)
        metrics["reward_nonfinite"] = self.nonfinite_rewards
        groups = list(range(len(ro.items)))
        if cfg.online_filter:
            r = rewards.view(-1, cfg.group_size)
            groups = [g for g in groups if float(r[g].max() - r[g].min()) > 0]
        metrics["groups_kept"] = len(groups)
        if groups:
            kept = ro if len(groups) == len(ro.items) else ro.select_groups(groups)
            r_kept = rewards.view(-1, cfg.group_size)[groups].reshape(-1)
            adv = self.ops.group_advantages(r_kept, cfg.group_size, scale=cfg.adv_scale)
            t1 = time.perf_counter()
            metrics.update(self.update(kept, adv))
            metrics["update_s"] = time.perf_counter() - t1
        else:  # every group had equal rewards: no signal, no update
            metrics.update(skipped=1, skip_reason="all groups filtered")
        self.step += 1
        dt = time.perf_counter() - t0
        metrics.update(
            rollout_s=t_roll,
            step_time_s=dt,
            tokens_per_s=sum(ro.num_tokens) / dt,  # generated response tokens per second of the whole step
            lr=self.sched.get_last_lr()[0],
            peak_mem_mb=peak_mem_mb(self.device),
        )
        return metrics

    def rollout(self, items: list) -> Rollouts:
        cfg = self.cfg
        return generate_rollouts(
            self.policy, items, n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
        )

    def score(self, ro: Rollouts) -> tuple[torch.Tensor, dict[str, list[float]], list[float]]:
        """-> (rewards [P*n] fp32, component name -> P*n values, accuracy P*n)."""
        from pebr.rewards import accuracy_reward

        overall, comps, acc = [], {}, []
        for row, (text, k) in enumerate(zip(ro.texts, ro.num_tokens)):
            item = ro.item_of(row)
            r = self.reward_fn(text, item, k)
            value = float(r["overall"])
            if not math.isfinite(value):  # a broken scorer must not poison the advantages: count it, score 0
                self.nonfinite_rewards += 1
                value = 0.0
            overall.append(value)
            for name, v in r.items():
                if name != "overall":
                    comps.setdefault(name, []).append(float(v))
            acc.append(float(accuracy_reward(text, item.answer)))
        return torch.tensor(overall, dtype=torch.float32), comps, acc

    # ---- update

    def _micro_logprobs(self, policy, ro: Rollouts, groups: list[int], width: int, *, grad: bool, entropy: bool):
        """log-probs [b, width] of the responses of these groups under `policy` (image once per group)."""
        n = ro.group_size
        rows = torch.tensor([g * n + j for g in groups for j in range(n)])
        sub = ro.select_groups(groups) if len(groups) != len(ro.items) else ro
        L = ro.prompt_len
        seq = ro.sequences[rows][:, : L + width]
        att = ro.attention_mask[rows][:, : L + width]
        with torch.set_grad_enabled(grad):
            feats = image_features(policy.model, sub.prompt.pixel_values, sub.prompt.image_grid_thw)
            return response_logprobs(
                policy.model, seq, att, prompt_len=L, group_size=n, image_feats=feats,
                image_grid_thw=sub.prompt.image_grid_thw, image_token_id=policy.image_token_id,
                temperature=self.cfg.temperature if self.cfg.temperature > 0 else 1.0, return_entropy=entropy,
            )

    def update(self, ro: Rollouts, adv: torch.Tensor) -> dict:
        """Mini-batches of whole groups (one AdamW step each), micro-batches for gradient accumulation."""
        cfg, n = self.cfg, ro.group_size
        model = self.policy.model
        model.train()
        P = len(ro.items)
        mini = min(cfg.mini_batch, P)
        micro_groups = max(1, cfg.micro_batch // n)
        n_updates = math.ceil(P / mini) * cfg.ppo_epochs
        old = self._old_logprobs(ro) if n_updates > 1 else None
        sums = {"loss": 0.0, "kl": 0.0, "ppo_kl": 0.0, "clipfrac_high": 0.0, "clipfrac_low": 0.0, "entropy": 0.0}
        weight_total, norms, skipped = 0.0, [], 0
        for _ in range(cfg.ppo_epochs):
            for m0 in range(0, P, mini):
                mini_groups = list(range(m0, min(P, m0 + mini)))
                mini_rows = [g * n + j for g in mini_groups for j in range(n)]
                denom = self._agg_denominator(ro.response_mask[mini_rows])
                self.opt.zero_grad(set_to_none=True)
                for c0 in range(0, len(mini_groups), micro_groups):
                    groups = mini_groups[c0 : c0 + micro_groups]
                    rows = [g * n + j for g in groups for j in range(n)]
                    mask = ro.response_mask[rows]
                    width = max(1, int(mask.sum(0).nonzero().max()) + 1) if mask.any() else 1
                    mask = mask[:, :width]
                    ref = None
                    if self.reference is not None and cfg.kl_coef > 0:
                        ref = self._micro_logprobs(self.reference, ro, groups, width, grad=False, entropy=False)
                    logp, ent = self._micro_logprobs(self.policy, ro, groups, width, grad=True, entropy=True)
                    loss, m = self.ops.grpo_loss(
                        logp, adv[rows].to(logp.device), mask,
                        old_logp=None if old is None else old[rows][:, :width],
                        ref_logp=ref, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                        kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, loss_agg=cfg.loss_agg,
                    )
                    w = self._agg_weight(mask) / denom  # this micro-batch's share of the mini-batch loss
                    (loss * w).backward()
                    tok = float(mask.sum())
                    weight_total += tok
                    sums["loss"] += float(loss.detach()) * tok
                    sums["entropy"] += masked_mean(ent.detach(), mask) * tok
                    for k in ("kl", "ppo_kl", "clipfrac_high", "clipfrac_low"):
                        sums[k] += float(torch.as_tensor(m[k]).detach()) * tok
                params = [p for p in model.parameters() if p.requires_grad]
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if torch.isfinite(norm):
                    self.opt.step()
                    self.sched.step()
                    norms.append(float(norm))
                else:  # a non-finite gradient would poison AdamW's moments: skip this update, keep going
                    skipped += 1
                    self.log(f"step {self.step + 1}: gradient norm is {float(norm)}; update skipped")
                self.opt.zero_grad(set_to_none=True)
        out = {k: v / max(weight_total, 1.0) for k, v in sums.items()}
        out["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
        out["skipped"] = skipped
        out["updates"] = n_updates - skipped
        return out

    def _agg_weight(self, mask: torch.Tensor) -> float:
        # token-mean: a micro-batch weighs by its tokens; the seq-mean variants by its sequences.
        return float(mask.sum()) if self.cfg.loss_agg == "token-mean" else float(mask.shape[0])

    def _agg_denominator(self, mask: torch.Tensor) -> float:
        return max(self._agg_weight(mask), 1.0)

    @torch.no_grad()
    def _old_logprobs(self, ro: Rollouts) -> torch.Tensor:
        """[P*n, R] log-probs under the policy before any update of this step."""
        n, R = ro.group_size, ro.response_mask.shape[1]
        micro_groups = max(1, self.cfg.micro_batch // n)
        self.policy.model.eval()
        parts = []
        for c0 in range(0, len(ro.items), micro_groups):
            groups = list(range(c0, min(len(ro.items), c0 + micro_groups)))
            parts.append(self._micro_logprobs(self.policy, ro, groups, R, grad=False, entropy=False))
        self.policy.model.train()
        return torch.cat(parts)
