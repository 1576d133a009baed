"""GRPO on the engine's ops: the perception (stage 1) and reasoning (stage 2) trainer.

    trainer = GRPOTrainer(cfg, policy=policy, reference=frozen_copy, items=items,
                          reward_fn=fn, run_dir="runs/stage1", init_model="runs/stage0/...", world=world)
    trainer.train()        # pebr.trainers.base.Trainer's loop; train_step() -> rollout / score / update

One step: take `rollout_batch` prompts in the global data order, this rank's share of them
(pebr.run.distributed.World.share); `rollout` samples n responses each (groups stay together on
their rank, each image is encoded once per prompt); `score` runs the stage's reward;
`engine.ops.group_advantages` normalizes within each group (no communication: groups are whole);
`update` runs one `minibatch_step` (one AdamW step) per mini-batch of groups, each accumulating
micro-batches, with log-probs from `engine.ops.linear_token_logprobs` on the last hidden states
and the loss from `engine.ops.grpo_loss`. Policy and reference forwards run each group's prompt
through the decoder once, the n responses attending to its keys and values
(`pebr.model.shared_prefix`; `--no-shared-prefix` runs every sequence whole, with the same result).

Loss normalization is global and independent of the micro-batch split: a micro-batch's
`grpo_loss` is weighted by its share of the mini-batch's tokens (token-mean) or sequences
(seq-mean-*), counted over every rank before the first backward. `seq-mean-token-sum-norm`
(Dr.GRPO) divides each sequence's sum by a constant, `max_new_tokens`, not by the padded width
of whatever micro-batch it landed in.

Departures from EasyR1, and why:
- old log-probs are not recomputed when there is one update per rollout (rollout_batch ==
  mini_batch and ppo_epochs == 1): they equal the current ones, and grpo_loss uses logp.detach().
- with several updates per rollout they are the sampler's (`old_logprobs="rollout"`): the
  rollout ran the same policy at the same temperature and recorded log-softmax(logits / T) of
  every sampled token over the whole vocabulary (pebr/rollout/hf_engine.py), so a policy forward over the
  step's rollouts (a tenth of a tiny step) would compute the same numbers again. The first step
  that needs them recomputes them once and compares: if any real token differs by more than
  ROLLOUT_OLD_LOGP_TOL (a bf16 or other rollout engine can), every later step recomputes, logged.
- reference log-probs are computed per micro-batch just before the policy's forward (no pass
  over the whole batch first), which is the same numbers with less memory held.
- a step whose gradient norm is not finite is skipped (no optimizer step) and logged.
- online filtering (DAPO) drops groups with equal rewards on each rank; ranks then run the same
  number of mini- and micro-batches, a rank short of groups running a zero-weight pass over one
  of its groups, so that no rank waits in a collective another skipped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import TYPE_CHECKING

import torch

from engine import nvtx
from pebr.data.order import DataOrder
from pebr.model.forward import image_features, response_logprobs
from pebr.model.shared_prefix import shared_prefix_logprobs
from pebr.model.shared_prefix import supports as shared_prefix_support
from pebr.rewards import accuracy_reward
from pebr.rollout.factory import build_rollout_engine
from pebr.rollout.hf_engine import generate_rollouts
from pebr.rollout.types import Rollouts, group_rows
from pebr.trainers.base import Trainer

if TYPE_CHECKING:  # the type only: trainers sit below the recipe layer (docs/pebr-map.md)
    from pebr.recipe.config import TrainConfig

# Largest |rollout log-prob - recomputed log-prob| on a real token for which the rollout's are used
# as old log-probs: exp(1e-3) moves a PPO ratio by 0.1%, far inside its clip (0.2). fp32 on CPU
# measured 5e-8 a token on average (rollout_logp_diff of the default run) and 6e-6 at most.
ROLLOUT_OLD_LOGP_TOL = 1e-3

# What forward_backward_step sums over micro-batches (token-weighted metrics carry their tokens).
SUMMED = ("loss", "tokens", "entropy", "kl", "ppo_kl", "clipfrac_high", "clipfrac_low", "rollout_logp_diff",
          "rollout_tokens", "padded_tokens")


@dataclasses.dataclass
class MicroBatch:
    """Groups of one micro-batch and their weight in the mini-batch loss."""

    groups: list[int]  # prompt indices into the step's (kept) rollouts
    weight: float  # multiplies grpo_loss: world_size * (this micro-batch's share of the global count)
    loss_weight: float  # the same without world_size: its share of the logged mini-batch loss


class GRPOTrainer(Trainer):
    desc = "GRPO"

    def __init__(self, cfg: TrainConfig, *, policy, reference, items: list, reward_fn, run_dir: str,
                 init_model: str | None, log=print, metrics_log=None, world=None, rollout_engine=None):
        """policy: the Policy trained in place; reference: a frozen Policy (or None when kl_coef == 0,
        or when the policy has LoRA adapters: its reference is then itself with the adapters off);
        reward_fn(text, item, num_tokens) -> dict with "overall"; metrics_log: a
        `pebr.run.metrics_log.MetricsLog` (one line per step, written by rank 0); rollout_engine: what
        generates the rollouts (default: `cfg.rollout_engine` from pebr.rollout.factory, on this
        trainer's policy), told of every optimizer step through its `update_weights`."""
        import engine.ops

        super().__init__(cfg, policy=policy, run_dir=run_dir, world=world, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                         freeze_vision=cfg.freeze_vision, stage=cfg.stage, init_model=init_model, log=log,
                         metrics_log=metrics_log)
        self.desc = f"stage {cfg.stage} GRPO"
        self.reference, self.items, self.reward_fn = reference, list(items), reward_fn
        # LoRA: the reference is the policy's frozen base, the same model with its adapters off
        # (pebr.model.lora.adapters_disabled): no second model in memory
        self.reference_is_base = reference is None and policy.adapter is not None and cfg.kl_coef > 0
        self.ops = engine.ops
        self.device = policy.device
        self.ref_runner = None
        if reference is not None and self.world.distributed:
            from pebr.run.fsdp import shard_model

            self.ref_runner = shard_model(reference.model, mixed_bf16=cfg.dtype == "bfloat16",
                                          cpu_offload=cfg.cpu_offload)
        self.order = DataOrder(len(self.items), seed=cfg.seed)
        steps_per_epoch = max(1, len(self.items) // cfg.rollout_batch)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
        self.nonfinite_rewards = 0
        self.rollout_engine = rollout_engine or build_rollout_engine(cfg.rollout_engine, policy, run=self.run,
                                                                     shared_prefix=cfg.shared_prefix, log=self.log)
        # whether the rollout's log-probs matched a recompute (None: not checked yet in this process)
        self._rollout_old_ok: bool | None = None

    def after_optimizer_step(self) -> None:
        self.rollout_engine.update_weights(self.policy.model)  # the next rollout samples the new policy

    def progress_postfix(self, metrics: dict) -> dict:
        recent = [m["reward/overall"] for m in self.history[-10:]]
        return {"reward": f"{sum(recent) / len(recent):.3f}", "acc": f"{metrics['accuracy']:.2f}"}

    # ---- one step

    def train_step(self) -> dict:
        cfg, world = self.cfg, self.world
        t0 = time.perf_counter()
        mini = min(cfg.mini_batch, cfg.rollout_batch)
        idx = world.share(self.order.take(cfg.rollout_batch), mini)
        ro = self.rollout([self.items[i] for i in idx])
        t_roll = time.perf_counter() - t0
        self.nonfinite_rewards = 0
        rewards, components, accuracy = self.score(ro)
        # Per-row means over the whole job: every rank holds the same number of rows.
        names = sorted(components)
        local = [float(rewards.mean()), sum(accuracy) / len(accuracy), sum(ro.num_tokens) / len(ro.num_tokens),
                 sum(ro.truncated) / len(ro.truncated), self.nonfinite_rewards]
        local += [sum(components[n]) / len(components[n]) for n in names]
        glob = (world.sum(local) / world.world_size).tolist()
        metrics = {"step": self.step + 1, "epoch": self.order.epoch, "data_position": self.order.position,
                   "reward/overall": glob[0], "accuracy": glob[1], "response_length": glob[2], "truncated": glob[3],
                   "reward_nonfinite": int(round(glob[4] * world.world_size))}
        metrics.update({f"reward/{n}": v for n, v in zip(names, glob[5:])})
        groups = list(range(len(ro.items)))
        if cfg.online_filter:
            r = rewards.view(-1, cfg.group_size)
            groups = [g for g in groups if float(r[g].max() - r[g].min()) > 0]
        kept_total = int(world.sum([len(groups)])[0])
        metrics["groups_kept"] = kept_total
        if kept_total:
            adv = torch.zeros(len(ro.items) * cfg.group_size)
            if groups:
                rows = group_rows(groups, cfg.group_size)
                adv[rows] = self.ops.group_advantages(rewards[rows], cfg.group_size, scale=cfg.adv_scale).cpu()
            t1 = time.perf_counter()
            metrics.update(self.update(ro, adv, groups))
            metrics["update_s"] = time.perf_counter() - t1
        else:  # every group of every rank had equal rewards: no signal, no update (on every rank alike)
            metrics.update(skipped=1, skip_reason="all groups filtered")
        self.step += 1
        metrics["rollout_s"] = t_roll
        metrics.update(self.step_metrics(t0, sum(ro.num_tokens)))
        return metrics

    def rollout(self, items: list) -> Rollouts:
        cfg = self.cfg
        from pebr.run.fsdp import gathered

        with nvtx.range("rollout"), gathered(self.runner) if self.runner is not None else contextlib.nullcontext():
            return generate_rollouts(
                self.policy, items, n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens, engine=self.rollout_engine,
            )

    def score(self, ro: Rollouts) -> tuple[torch.Tensor, dict[str, list[float]], list[float]]:
        """-> (rewards [P*n] fp32, component name -> P*n values, accuracy P*n)."""
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

    def _logprobs(self, which: str, ro: Rollouts, groups: list[int], width: int, *, grad: bool, entropy: bool):
        """log-probs [b, width] of the responses of these groups under the policy or the reference."""
        n = ro.group_size
        rows = torch.tensor(group_rows(groups, n))
        sub = ro.select_groups(groups) if len(groups) != len(ro.items) else ro
        L = ro.prompt_len
        seq = ro.sequences[rows][:, : L + width]
        att = ro.attention_mask[rows][:, : L + width]
        image_token_id = self.policy.image_token_id
        temperature = self.cfg.temperature if self.cfg.temperature > 0 else 1.0

        shared = self._use_shared_prefix(which)
        resp_mask = ro.response_mask[rows][:, :width]

        def fn(model):
            feats = image_features(model, sub.prompt.pixel_values, sub.prompt.image_grid_thw)
            if shared:  # the prompt once per group (pebr/model/shared_prefix.py); the same result
                return shared_prefix_logprobs(
                    model, sub.prompt.input_ids, sub.prompt.attention_mask, seq[:, L:], resp_mask.to(seq.device),
                    group_size=n, image_feats=feats, image_grid_thw=sub.prompt.image_grid_thw,
                    image_token_id=image_token_id, temperature=temperature, return_entropy=entropy,
                    images_per_prompt=sub.prompt.images_per_prompt,
                )
            return response_logprobs(
                model, seq, att, prompt_len=L, group_size=n, image_feats=feats,
                image_grid_thw=sub.prompt.image_grid_thw, image_token_id=image_token_id,
                temperature=temperature, return_entropy=entropy, images_per_prompt=sub.prompt.images_per_prompt,
            )

        with torch.set_grad_enabled(grad):
            if which == "policy":
                return self.run(fn)
            if self.reference_is_base:
                from pebr.model.lora import adapters_disabled

                with adapters_disabled(self.policy.model):
                    return self.run(fn)
            if self.ref_runner is not None:
                return self.ref_runner(fn)
            return fn(self.reference.model)

    def _use_shared_prefix(self, which: str) -> bool:
        """Whether `which` model ("policy" / "reference") runs the shared-prefix path; a model that
        cannot is logged once and runs the unshared path (the same result, more work)."""
        if not self.cfg.shared_prefix:
            return False
        cache = self.__dict__.setdefault("_shared_prefix_ok", {})
        if which not in cache:
            model = self.policy.model if which == "policy" or self.reference is None else self.reference.model
            why = shared_prefix_support(model)
            if why is not None:
                self.log(f"{which}: shared-prefix update off ({why}); every sequence runs whole")
            cache[which] = why is None
        return cache[which]

    def _count(self, ro: Rollouts, groups: list[int]) -> float:
        """What the aggregation averages over, in these groups: tokens (token-mean) or sequences."""
        if not groups:
            return 0.0
        if self.cfg.loss_agg == "token-mean":
            n = ro.group_size
            return float(ro.response_mask[group_rows(groups, n)].sum())
        return float(len(groups) * ro.group_size)

    def plan(self, ro: Rollouts, groups: list[int]) -> list[list[MicroBatch]]:
        """The step's mini-batches of micro-batches, the same count on every rank, with their weights."""
        cfg, world, n = self.cfg, self.world, ro.group_size
        mini_local = max(1, min(cfg.mini_batch, cfg.rollout_batch) // world.world_size)
        micro_groups = max(1, cfg.micro_batch // n)
        minis = [groups[m0 : m0 + mini_local] for m0 in range(0, len(groups), mini_local)]
        # Every rank runs as many mini-batches as the rank with the most, each with as many
        # micro-batches as the rank with the most in it.
        n_minis = int(world.max([len(minis)])[0])
        minis += [[] for _ in range(n_minis - len(minis))]
        n_micro = world.max([math.ceil(len(m) / micro_groups) for m in minis] or [0]).tolist()
        totals = world.sum([self._count(ro, m) for m in minis] or [0.0]).tolist()
        plan = []
        for mini, k, total in zip(minis, n_micro, totals):
            chunks = [mini[c : c + micro_groups] for c in range(0, len(mini), micro_groups)]
            chunks += [[] for _ in range(int(k) - len(chunks))]
            mbs = []
            for chunk in chunks:
                share = self._count(ro, chunk) / total if total > 0 else 0.0
                if cfg.loss_agg == "seq-mean-token-sum-norm":
                    share /= max(1, cfg.max_new_tokens)  # Dr.GRPO's constant, not the micro-batch's width
                mbs.append(MicroBatch(groups=chunk, weight=share * world.world_size, loss_weight=share))
            plan.append(mbs)
        return plan

    def update(self, ro: Rollouts, adv: torch.Tensor, groups: list[int] | None = None) -> dict:
        """One AdamW step per mini-batch of `groups` (default all), ppo_epochs times -> update metrics."""
        cfg = self.cfg
        groups = list(range(len(ro.items))) if groups is None else list(groups)
        self.policy.model.train()
        plan = self.plan(ro, groups)  # the same every epoch: the groups and their counts do not change
        n_updates = len(plan) * cfg.ppo_epochs
        old = self.old_logprobs(ro) if n_updates > 1 else None
        totals: dict[str, float] = {}
        norms, skipped = [], 0
        for e in range(cfg.ppo_epochs):
            for j, mbs in enumerate(plan):
                # before the step's first optimizer step the policy is the rollout's: compare them
                first = e == 0 and j == 0
                out = self.minibatch_step(mbs, ro=ro, adv=adv, old=old, fallback=groups[:1] or [0],
                                          compare_rollout=first)
                skipped += int(out.pop("skipped"))
                norm = out.pop("grad_norm")
                if math.isfinite(norm):
                    norms.append(norm)
                for k, v in out.items():
                    totals[k] = totals.get(k, 0.0) + v
        # The same keys on every rank (a rank with no groups has no sums), in one all-reduce.
        g = dict(zip(SUMMED, self.world.sum([totals.get(k, 0.0) for k in SUMMED]).tolist()))
        tok, ro_tok = max(g["tokens"], 1.0), max(g["rollout_tokens"], 1.0)
        result = {"loss": g["loss"] / max(1, n_updates)}
        for k in ("kl", "ppo_kl", "clipfrac_high", "clipfrac_low", "entropy"):
            result[k] = g[k] / tok
        result["rollout_logp_diff"] = g["rollout_logp_diff"] / ro_tok if g["rollout_tokens"] else float("nan")
        result["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
        # the share of the update's response positions that were padding (trimmed per micro-batch)
        result["update_padding"] = 1.0 - g["tokens"] / g["padded_tokens"] if g["padded_tokens"] else 0.0
        result["skipped"] = skipped
        result["updates"] = n_updates - skipped
        return result

    def forward_backward_step(self, mb: MicroBatch, *, ro: Rollouts, adv, old, fallback, compare_rollout: bool) -> dict:
        """One micro-batch: reference and policy log-probs, grpo_loss, backward of its weighted share.

        An empty micro-batch (a rank short of groups) runs a zero-weight pass over `fallback`, so
        that FSDP's collectives line up across ranks."""
        cfg, n = self.cfg, ro.group_size
        groups, weight = (mb.groups, mb.weight) if mb.groups else (fallback, 0.0)
        rows = group_rows(groups, n)
        mask = ro.response_mask[rows]
        width = max(1, int(mask.sum(0).nonzero().max()) + 1) if mask.any() else 1
        mask = mask[:, :width].to(self.device)
        ref = None
        if (self.reference is not None or self.reference_is_base) and cfg.kl_coef > 0:
            with nvtx.range("reference_forward"):
                ref = self._logprobs("reference", ro, groups, width, grad=False, entropy=False)
        with nvtx.range("policy_forward"):
            logp, ent = self._logprobs("policy", ro, groups, width, grad=True, entropy=True)
        loss_agg = "seq-mean-token-sum" if cfg.loss_agg == "seq-mean-token-sum-norm" else cfg.loss_agg
        loss, m = self.ops.grpo_loss(
            logp, adv[rows].to(logp.device), mask,
            old_logp=None if old is None else old[rows][:, :width].to(logp.device),
            ref_logp=ref, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
            kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, loss_agg=loss_agg,
        )
        with nvtx.range("backward"):
            (loss * weight).backward()
        if not mb.groups:
            return {}
        tok = float(mask.sum())
        # response positions the passes computed: rows x the micro-batch's trimmed width
        out = {"loss": float(loss.detach()) * mb.loss_weight, "tokens": tok, "padded_tokens": float(mask.numel()),
               "entropy": float((ent.detach() * mask).sum())}
        for k in ("kl", "ppo_kl", "clipfrac_high", "clipfrac_low"):
            out[k] = float(m[k]) * tok
        if compare_rollout and ro.logprobs is not None:
            diff = (logp.detach() - ro.logprobs[rows][:, :width].to(logp.device)).abs()
            out["rollout_logp_diff"] = float((diff * mask).sum())
            out["rollout_tokens"] = tok
        return out

    def old_logprobs(self, ro: Rollouts) -> torch.Tensor:
        """[P*n, R] log-probs of the step's responses under the policy before its first update: the
        rollout's (cfg.old_logprobs == "rollout", once they have matched a recompute) or a
        recomputed forward. The choice is the same on every rank (the check is all-reduced)."""
        cfg = self.cfg
        use_rollout = cfg.old_logprobs == "rollout" and ro.logprobs is not None
        if not use_rollout or self._rollout_old_ok is False:
            return self._old_logprobs(ro)
        if self._rollout_old_ok:
            return ro.logprobs.detach().float().cpu()
        old = self._old_logprobs(ro)
        real = ro.response_mask.bool()
        local = float((old - ro.logprobs.float().cpu()).abs()[real].max()) if real.any() else 0.0
        worst = float(self.world.max([local])[0])
        ok = worst <= ROLLOUT_OLD_LOGP_TOL
        self._rollout_old_ok = ok
        self.log(f"old log-probs: the rollout's differ from a recompute by at most {worst:.2e} a token "
                 + (f"(<= {ROLLOUT_OLD_LOGP_TOL:g}): taken from the rollouts from now on" if ok else
                    f"(> {ROLLOUT_OLD_LOGP_TOL:g}): recomputed every step"))
        return old

    @torch.no_grad()
    def _old_logprobs(self, ro: Rollouts) -> torch.Tensor:
        """[P*n, R] log-probs under the policy before any update of this step (the same number of
        forwards on every rank)."""
        n, R = ro.group_size, ro.response_mask.shape[1]
        micro_groups = max(1, self.cfg.micro_batch // n)
        chunks = [list(range(c0, min(len(ro.items), c0 + micro_groups))) for c0 in range(0, len(ro.items), micro_groups)]
        self.policy.model.eval()
        with nvtx.range("old_logprobs"):
            parts = [self._logprobs("policy", ro, c, R, grad=False, entropy=False) for c in chunks]
        self.policy.model.train()
        return torch.cat(parts).cpu()
