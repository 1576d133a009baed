"""One GRPO update of fixed rollouts, in a world of one or under torchrun (FSDP2, gloo).

    python tests/dist/update_worker.py OUT.pt LOSS_AGG
    torchrun --standalone --nproc-per-node 2 tests/dist/update_worker.py OUT.pt LOSS_AGG

Every rank builds the same tiny policy and reference and the same rollouts (generated before
sharding, from a fixed seed), takes its share of the groups and runs `GRPOTrainer.update`; rank 0
writes the update's metrics and the full weights after the optimizer steps to OUT.pt.
"""
import dataclasses
import os
import sys
import tempfile

import torch

from pebr.recipe import config as C
from pebr.run.distributed import World, init_world
from pebr.run.fsdp import full_state_dict
from pebr.trainers.grpo import GRPOTrainer
from pebr.model.policy import build_tiny_policy
from pebr.rollout.hf_engine import generate_rollouts
from pebr.data.tasks import generate_items


def main(out_path: str, loss_agg: str) -> None:
    world = init_world(device="cpu", backend="gloo")
    cfg = dataclasses.replace(
        C.preset("tiny", stage=2), group_size=2, rollout_batch=8, mini_batch=int(os.environ.get("MINI", 8)), micro_batch=2, max_new_tokens=10,
        kl_coef=0.05, lr=1e-3, loss_agg=loss_agg, online_filter=False, progress=False, warmup_steps=0,
    )
    policy, reference = build_tiny_policy(seed=0), build_tiny_policy(seed=1)
    reference.model.eval().requires_grad_(False)
    if os.environ.get("LORA") == "1":  # LoRA: adapters on the decoder, the reference the base itself
        from pebr.model.lora import add_lora

        policy.adapter, reference = add_lora(policy.model, rank=4, alpha=8.0), None
        g = torch.Generator().manual_seed(11)  # B = 0 at init would make A's gradient 0: random factors
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if ".lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    items = generate_items(cfg.rollout_batch, seed=3)
    torch.manual_seed(1234)
    ro = generate_rollouts(policy, items, n=cfg.group_size, temperature=1.0, max_new_tokens=cfg.max_new_tokens)
    adv = torch.randn(len(ro.texts), generator=torch.Generator().manual_seed(7))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = GRPOTrainer(cfg, policy=policy, reference=reference, items=items, reward_fn=None, run_dir=run_dir,
                              init_model=None, world=world)
        mine = world.share(list(range(len(items))), cfg.mini_batch)
        local = ro.select_groups(mine) if world.distributed else ro
        rows = [g * cfg.group_size + j for g in mine for j in range(cfg.group_size)]
        kept = None
        if os.environ.get("FILTERED") == "1":
            # Online filtering left rank 1 no group: it must still join every collective (zero-weight
            # passes) and the job must train on rank 0's groups alone, as one rank would.
            rank0 = World(rank=0, world_size=2).share(list(range(len(items))), cfg.mini_batch)
            kept = rank0 if not world.distributed else (list(range(len(mine))) if world.rank == 0 else [])
        grads = {}
        step = trainer.opt.step

        def record_then_step(*a, **k):  # the gradient of the first optimizer step, gathered whole
            if not grads:
                for name, p in policy.model.named_parameters():
                    if p.grad is not None:
                        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                        grads[name] = g.detach().clone()
            return step(*a, **k)

        trainer.opt.step = record_then_step
        metrics = trainer.update(local, adv[rows], kept)
        weights = full_state_dict(policy.model, distributed=world.distributed)
    if world.is_main:
        torch.save({"metrics": metrics, "weights": weights, "grads": grads, "world_size": world.world_size}, out_path)
    world.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
