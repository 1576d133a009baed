"""The stages of the recipe, each on one process or many (torchrun): what `python -m pebr.train` runs.

    world = init_world(device=cfg.device, backend=cfg.dist_backend)
    path = run(cfg, world)          # stage 0: run_sft; stages 1-2: run_grpo (sampling first)

Every rank runs the same code on the same data order; rank 0 alone writes files other than its
share of sharded state (logs, metrics, the sampling cache, config.json), the other ranks wait
at a barrier where rank 0 touches the file system. Dataset-level sampling splits its items
across ranks and merges the result on rank 0. The pieces of a stage are built by
pebr.recipe.builder, the one builder pebr.experiment, pebr.sample and pebr.eval use too.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from pebr.errors import MissingPolicyError
from pebr.recipe import config as C
from pebr.recipe.builder import (
    build_grpo_trainer,
    build_sft_trainer,
    make_reward_fn,
    resume_point,
    resumed_init_model,
)
from pebr.recipe.items import fit_context, load_items
from pebr.recipe.paths import latest_policy_path, stage_dir
from pebr.recipe.splits import ensure_sampling, sampling_plan, select_split
from pebr.run.distributed import World
from pebr.run.lock import hold
from pebr.run.log_setup import stage_log
from pebr.run.machine import describe as describe_machine
from pebr.run.signals import stop_on_signals

log = logging.getLogger("pebr")


_NOTHING_RAN = "no step of it had run and nothing half-written was kept; run the command again"


def run(cfg: C.TrainConfig, world: World | None = None) -> str:
    """Run one stage -> path of the policy it produced."""
    t0 = time.perf_counter()
    path = run_sft(cfg, world) if cfg.stage == 0 else run_grpo(cfg, world)
    log.info(f"wall time {time.perf_counter() - t0:.0f}s")
    return path


# ---- stage 0


def run_sft(cfg: C.TrainConfig, world: World | None = None) -> str:
    """Stage 0 -> path of the warm-up policy (OUT/stage0's latest checkpoint)."""
    world = world or World(device=torch.device(cfg.device))
    sdir = stage_dir(cfg, 0)
    # a signal before the loop (the trainer's own handling takes over inside it) ends the stage at once
    with (stop_on_signals("the warm-up's set-up (loading its policy and data)", then=_NOTHING_RAN),
          stage_log(sdir, world), hold(sdir, world, log=log.warning)):  # one run per stage folder (pebr.run.lock)
        log.info(describe_machine(world.device))  # step times mean nothing without the CPU and its vector path
        ckpts, latest = resume_point(cfg, sdir, world)
        trainer = build_sft_trainer(cfg, world, sdir=sdir, checkpoints=ckpts, latest=latest)
        log.info(f"stage 0 (warm-up SFT): {trainer.total_steps} steps ({len(trainer.items)} items, {cfg.sft.epochs} "
                 f"epochs, batch {cfg.sft.batch_size}), lr {cfg.sft.lr}, model {cfg.model or 'built-in tiny policy'}")
        hist = trainer.train()
        if world.broadcast_object(ckpts.latest()) is None:  # zero steps asked for: still leave a loadable policy
            trainer.save(final=True)
        if hist:
            log.info(f"stage 0 done: loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f} in {len(hist)} steps")
        path = ckpts.latest()
        log.info(f"stage 0 policy: {path}")
        return path


def warmup_config(cfg: C.TrainConfig) -> C.TrainConfig:
    """The stage-0 config stage 1 runs first when there is no warm-up policy: the preset's stage 0
    with this run's settings (its --sft-* and optimizer flags, data, seed, device, ...). --max-steps
    is stage 1's."""
    return dataclasses.replace(C.preset(cfg.preset, 0), output_dir=cfg.output_dir, seed=cfg.seed,
                               device=cfg.device, dtype=cfg.dtype, progress=cfg.progress, data=cfg.data,
                               dist_backend=cfg.dist_backend, cpu_offload=cfg.cpu_offload,
                               gradient_checkpointing=cfg.gradient_checkpointing, sft=cfg.sft,
                               sampling=cfg.sampling, optimizer=cfg.optimizer, log_every=cfg.log_every,
                               keep_checkpoints=cfg.keep_checkpoints, tensorboard=cfg.tensorboard,
                               model_size=cfg.model_size, text_layers=cfg.text_layers, vision_blocks=cfg.vision_blocks,
                               image_size=cfg.image_size)


def sft_plan(cfg: C.TrainConfig) -> str:
    """'N steps (items x epochs / batch)' of a warm-up, before it is built."""
    s = cfg.sft
    if cfg.data:
        return f"{s.epochs} epochs over the --data records in batches of {s.batch_size}"
    steps = s.epochs * -(-s.num_items // s.batch_size)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    return f"{steps} steps ({s.num_items} items x {s.epochs} epochs / batch {s.batch_size}; --sft-items, --sft-epochs, --sft-batch)"


# ---- stages 1 and 2


def resolve_init_model(cfg: C.TrainConfig, world: World | None = None) -> str:
    """The HF folder stage 1/2 starts from: --model, else the previous stage's latest checkpoint
    (stage 1 builds stage 0 first when there is none). MissingPolicyError for stage 2 without one."""
    if cfg.model:
        return cfg.model
    prev = cfg.stage - 1
    path = latest_policy_path(cfg, prev)
    if path:
        return path
    if cfg.stage == 1:
        sft_cfg = warmup_config(cfg)
        then = "" if cfg.train_split == "all" else f", then dataset-level sampling: {sampling_plan(cfg)}"
        log.info(f"no stage-0 policy under {stage_dir(cfg, 0)}: running first the warm-up SFT (stage 0): "
                 f"{sft_plan(sft_cfg)}{then}"
                 + (f"; --max-steps {cfg.max_steps} counts stage-1 steps only" if cfg.max_steps is not None else ""))
        return run_sft(sft_cfg, world)
    raise MissingPolicyError(f"no stage-{prev} policy under {stage_dir(cfg, prev)}; run --stage {prev} first or pass --model")


def run_grpo(cfg: C.TrainConfig, world: World | None = None) -> str:
    """Stage 1 or 2 -> path of the final checkpoint."""
    world = world or World(device=torch.device(cfg.device))
    sdir = stage_dir(cfg)
    with (stop_on_signals(f"stage {cfg.stage}'s set-up (loading its policy and items)", then=_NOTHING_RAN),
          stage_log(sdir, world), hold(sdir, world, log=log.warning)):  # one run per stage folder (pebr.run.lock)
        log.info(describe_machine(world.device))
        ckpts, latest = resume_point(cfg, sdir, world)
        init_model = resumed_init_model(cfg, latest) if latest else resolve_init_model(cfg, world)
        from pebr.model.context_limits import text_only_policy

        items = fit_context(load_items(cfg, purpose="rl"), text_only_policy(init_model), max_new_tokens=cfg.max_new_tokens)
        if cfg.train_split == "all":  # every item trains: the split would be computed for nothing
            log.info(f"--split all: {len(items)} items, no dataset-level sampling")
            train_items = items
        else:
            train_items = select_split(cfg, items, ensure_sampling(cfg, init_model, items, world))
        trainer = build_grpo_trainer(cfg, world, sdir=sdir, checkpoints=ckpts, latest=latest, init_model=init_model,
                                     items=train_items, reward_fn=make_reward_fn(cfg))
        log.info(f"stage {cfg.stage} ({C.STAGE_NAMES[cfg.stage]}): {trainer.total_steps} steps, "
                 f"{len(train_items)} items (split {cfg.train_split!r}), "
                 f"from {init_model}; n={cfg.group_size}, {cfg.rollout_batch} prompts/step, lr {cfg.lr}, "
                 f"T={cfg.temperature}, max_new_tokens {cfg.max_new_tokens}, {world.world_size} rank(s)")
        t0 = time.perf_counter()
        hist = trainer.train()
        if hist:
            log.info(f"stage {cfg.stage} done: {len(hist)} steps in {time.perf_counter() - t0:.0f}s; " + grpo_summary(hist))
        path = ckpts.latest()
        log.info(f"stage {cfg.stage} policy: {path}")
        return path


def grpo_summary(hist: list[dict]) -> str:
    """Reward of the first vs the last steps (at most 10 each, never overlapping) and accuracy."""
    r = [m["reward/overall"] for m in hist]
    a = [m["accuracy"] for m in hist]
    if len(r) == 1:
        return f"reward/overall {r[0]:.3f}, accuracy {a[0]:.3f} (1 step)"
    k = min(10, len(r) // 2)
    return (f"reward/overall first {k} {sum(r[:k]) / k:.3f} -> last {k} {sum(r[-k:]) / k:.3f}; "
            f"accuracy last {k} {sum(a[-k:]) / k:.3f}")
