"""Old log-probs of a GRPO step with several updates (pebr.trainers.grpo.GRPOTrainer.old_logprobs).

- `old_logprobs="rollout"`: the first step that needs them recomputes once, finds the sampler's
  equal (fp32, the recorder's log-softmax over the whole vocabulary) and from then on takes the
  rollout's without a policy forward; the update is the one a recompute gives.
- rollout log-probs that differ (as a bf16 or foreign rollout engine's can) are caught by that
  check: every later step recomputes, and the message says so.
- `old_logprobs="recompute"` always runs the forward.
"""
import dataclasses
import random

import torch

from pebr.recipe import config as C
from pebr.run.distributed import World
from pebr.trainers.grpo import ROLLOUT_OLD_LOGP_TOL, GRPOTrainer
from pebr.model.policy import build_tiny_policy
from pebr.rollout.hf_engine import generate_rollouts
from pebr.data.tasks import generate_items

# 4 prompts x n = 2 in two mini-batches of 2 prompts: two updates a step, so old log-probs are needed
CFG = dict(group_size=2, rollout_batch=4, mini_batch=2, micro_batch=4, max_new_tokens=10, kl_coef=0.05, lr=1e-3,
           progress=False, warmup_steps=0)


def _setup(tmp_path, name: str, **over):
    cfg = dataclasses.replace(C.preset("tiny", stage=2), **{**CFG, **over})
    seed = random.randrange(10**6)
    policy, reference = build_tiny_policy(seed=0), build_tiny_policy(seed=1)
    reference.model.eval().requires_grad_(False)
    items = generate_items(cfg.rollout_batch, seed=seed)
    torch.manual_seed(seed)
    ro = generate_rollouts(policy, items, n=cfg.group_size, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    logged = []
    trainer = GRPOTrainer(cfg, policy=policy, reference=reference, items=items, reward_fn=None,
                          run_dir=str(tmp_path / name), init_model=None, world=World(), log=logged.append)
    return trainer, ro, logged


def _count_policy_forwards(trainer) -> list:
    """Policy log-prob passes, counted where each begins: one vision-tower call (the step's images)."""
    calls = []
    trainer.policy.model.model.visual.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def test_rollout_logprobs_checked_once_then_used(tmp_path):
    trainer, ro, logged = _setup(tmp_path, "a")
    real = ro.response_mask.bool()
    assert real.sum() > 8, "responses must hold tokens"
    calls = _count_policy_forwards(trainer)
    first = trainer.old_logprobs(ro)
    assert calls, "the first step must recompute to check"
    # the recompute and the sampler agree on every real token (fp32)
    assert float((first - ro.logprobs).abs()[real].max()) <= 1e-4
    assert len(logged) == 1 and "taken from the rollouts" in logged[0], logged
    calls.clear()
    again = trainer.old_logprobs(ro)
    assert not calls, "once checked, the rollout's log-probs are used without a forward"
    assert torch.equal(again, ro.logprobs.float())
    assert len(logged) == 1  # logged once


def test_update_with_rollout_logprobs_equals_recompute(tmp_path):
    """One set of rollouts through a two-update step, each mode on its own fresh copy of the same
    policy: the same loss, PPO KL and gradients in both updates, one policy pass fewer per
    micro-batch with the rollout's log-probs."""
    trainer_a, ro, _ = _setup(tmp_path, "recompute", old_logprobs="recompute")
    trainer_b = GRPOTrainer(dataclasses.replace(trainer_a.cfg, old_logprobs="rollout"), policy=build_tiny_policy(seed=0),
                            reference=trainer_a.reference, items=trainer_a.items, reward_fn=None,
                            run_dir=str(tmp_path / "rollout"), init_model=None, world=World(), log=lambda *a: None)
    trainer_b._rollout_old_ok = True  # past the first step's check
    calls_a, calls_b = _count_policy_forwards(trainer_a), _count_policy_forwards(trainer_b)
    grads_a, grads_b = _record_grads(trainer_a), _record_grads(trainer_b)
    adv = torch.randn(len(ro.texts))
    ma, mb = trainer_a.update(ro, adv), trainer_b.update(ro, adv)
    assert ma["updates"] == mb["updates"] == 2
    # each update runs one policy pass (one micro-batch); recompute adds one pass per micro-batch of groups first
    assert (len(calls_a), len(calls_b)) == (4, 2), (len(calls_a), len(calls_b))
    assert abs(ma["loss"] - mb["loss"]) <= 1e-5 * max(1.0, abs(ma["loss"])), (ma["loss"], mb["loss"])
    # ppo_kl averages old - new log-probs: fp32 rounding of the two sources (~5e-6 a token) at most
    assert abs(ma["ppo_kl"] - mb["ppo_kl"]) <= 5e-6 + 1e-3 * abs(ma["ppo_kl"]), (ma["ppo_kl"], mb["ppo_kl"])
    # the updates moved the weights (lr 1e-3): the second one ran on a policy its old log-probs do not match
    w0, wa = build_tiny_policy(seed=0).model.state_dict(), trainer_a.policy.model.state_dict()
    assert max(float((wa[k] - w0[k]).abs().max()) for k in w0) > 1e-4
    # the gradients of both updates (AdamW's sign-like steps would magnify rounding in near-zero
    # entries). The two sources differ by up to ~6e-6 a token, so the ratios (and the gradient) by
    # that relative amount; old log-probs of the wrong policy would move them by 1e-2 and more.
    assert len(grads_a) == len(grads_b) == 2
    for ga, gb in zip(grads_a, grads_b):
        assert ga.keys() == gb.keys() and ga
        gmax = max(float(g.abs().max()) for g in ga.values())
        for name in ga:
            assert float((ga[name] - gb[name]).abs().max()) <= 1e-4 * gmax, name


def _record_grads(trainer) -> list:
    """The gradients at each optimizer step, copied before the step."""
    grads = []
    trainer.opt.register_step_pre_hook(lambda opt, args, kwargs: grads.append(
        {n: p.grad.detach().clone() for n, p in trainer.policy.model.named_parameters() if p.grad is not None}))
    return grads


def test_rollout_logprobs_that_differ_are_caught(tmp_path):
    trainer, ro, logged = _setup(tmp_path, "b")
    real = ro.response_mask.bool()
    good = ro.logprobs.clone()
    off = ro.logprobs.clone()
    off[real] += 10 * ROLLOUT_OLD_LOGP_TOL  # as a rollout engine in another precision could be
    ro.logprobs = off
    first = trainer.old_logprobs(ro)
    assert len(logged) == 1 and "recomputed every step" in logged[0], logged
    assert float((first - good).abs()[real].max()) <= 1e-4  # the recomputed values, not the rollout's
    calls = _count_policy_forwards(trainer)
    later = trainer.old_logprobs(ro)
    assert calls, "after a failed check every step recomputes"
    assert float((later - good).abs()[real].max()) <= 1e-4


def test_recompute_never_takes_the_rollouts(tmp_path):
    trainer, ro, logged = _setup(tmp_path, "c", old_logprobs="recompute")
    calls = _count_policy_forwards(trainer)
    for _ in range(2):
        trainer.old_logprobs(ro)
    assert len(calls) == 2 * 2 and not logged  # two micro-batches of 2 groups, each call
