"""The stages of the recipe, each on one process or many (torchrun): what `python -m pebr.train` runs.

    world = init_world(device=cfg.device, backend=cfg.dist_backend)
    path = run(cfg, world)          # stage 0: run_sft; stages 1-2: run_grpo (sampling first)

Every rank runs the same code on the same data order; rank 0 alone writes files other than its
share of sharded state (logs, metrics, the sampling cache, config.json), the other ranks wait
at a barrier where rank 0 touches the file system. Dataset-level sampling splits its items
across ranks and merges the result on rank 0.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import torch

from pebr.recipe import config as C
from pebr.run.distributed import World, seed_all
from pebr.run.machine import describe as describe_machine
from pebr.run.lock import hold

SFT_SEED = 2  # procedural warm-up items: a pool of their own

log = logging.getLogger("pebr")


# ---- pieces


def setup_logging(stage_dir: str, world: World | None = None) -> None:
    """Rank 0 logs to stderr and stage_dir/train.log; other ranks only their warnings and errors."""
    world = world or World()
    if not world.is_main:
        log.setLevel(logging.WARNING)
        return
    os.makedirs(stage_dir, exist_ok=True)
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(sys.stderr), logging.FileHandler(os.path.join(stage_dir, "train.log"))):
        h.setFormatter(fmt)
        log.addHandler(h)
    log.propagate = False


def stage_dir(cfg, stage: int | None = None) -> str:
    return os.path.join(cfg.output_dir, f"stage{cfg.stage if stage is None else stage}")


def latest_policy_path(cfg, stage: int) -> str | None:
    from pebr.run.checkpoint import Checkpointer

    root = os.path.join(stage_dir(cfg, stage), "checkpoints")
    return Checkpointer(root).latest() if os.path.isdir(root) else None


def _dtype(cfg, world: World | None = None) -> torch.dtype:
    """The dtype parameters are loaded in. Sharded (FSDP2) runs keep fp32 master weights and
    compute in bf16 through MixedPrecisionPolicy when --dtype bfloat16 (pebr.run.fsdp.shard_model)."""
    if world is not None and world.distributed:
        return torch.float32
    return getattr(torch, cfg.dtype)


def load_items(cfg, *, purpose: str) -> list:
    """--data records (bad rows skipped and reported) or built-in procedural items for `purpose`."""
    from pebr.data import tasks

    if cfg.data:
        from pebr.data.records import load_records_or_exit

        res = load_records_or_exit(cfg.data)
        log.info(f"data {cfg.data}: {res.summary()}")
        for row, why in res.skipped:
            log.info(f"  skipped row {row}: {why}")
        if not res.items:
            raise SystemExit(f"error: no usable rows in {cfg.data}")
        return res.items
    if purpose == "sft":
        return tasks.generate_items(cfg.sft.num_items, seed=SFT_SEED, kind="mixed", difficulty=cfg.difficulty)
    return tasks.generate_items(cfg.sampling.num_items, seed=cfg.sampling.seed, kind="mixed", difficulty=cfg.difficulty)


def fit_context(items: list, policy, *, max_new_tokens: int, reference: bool = False) -> list:
    """The items whose prompt (plus the response budget, or the reference response for the
    warm-up) fits the model's positions; the others are dropped, counted and logged."""
    from pebr.model.context_limits import drop_overlong

    kept, dropped = drop_overlong(items, policy, max_new_tokens=max_new_tokens, reference=reference)
    if dropped:
        log.info(f"{len(dropped)} of {len(items)} items do not fit the model's context and are left out")
        for item_id, why in dropped[:20]:
            log.info(f"  dropped {item_id}: {why}")
    if not kept:
        raise SystemExit("error: no item fits the model's context (see the log for each item's length)")
    return kept


def open_metrics_log(sdir: str, *, fresh: bool, world: World | None = None, cfg=None):
    """The stage's metrics.jsonl (rank 0 only; None elsewhere); TensorBoard too with --tensorboard."""
    from pebr.run.metrics_log import MetricsLog

    if world is not None and not world.is_main:
        return None
    path = os.path.join(sdir, "metrics.jsonl")
    if fresh and os.path.exists(path):
        os.remove(path)
    return _StepLog(MetricsLog(path, tensorboard=bool(getattr(cfg, "tensorboard", False))))


class _StepLog:
    """Adapts MetricsLog.log(step, metrics) to the trainers' append(metrics)."""

    def __init__(self, inner):
        self.inner = inner

    def append(self, metrics: dict) -> None:
        self.inner.log(metrics["step"], metrics)

    def truncate_after(self, step: int) -> None:
        self.inner.truncate_after(step)


# ---- stages


def run_sft(cfg, world: World | None = None) -> str:
    """Stage 0 -> path of the warm-up policy (OUT/stage0's latest checkpoint)."""
    world = world or World(device=torch.device(cfg.device))
    setup_logging(stage_dir(cfg, 0), world)
    with hold(stage_dir(cfg, 0), world, log=log.warning):  # one run per stage folder (pebr.run.lock)
        return _run_sft(cfg, world)


def _run_sft(cfg, world: World) -> str:
    from pebr.run.checkpoint import Checkpointer
    from pebr.model.policy import build_tiny_policy, load_policy
    from pebr.trainers.sft import SFTTrainer

    sdir = stage_dir(cfg, 0)
    log.info(describe_machine(world.device))  # step times mean nothing without the CPU and its vector path
    ckpts = Checkpointer(os.path.join(sdir, "checkpoints"))
    latest = world.broadcast_object(ckpts.latest() if cfg.resume else None)
    seed_all(cfg.seed)  # the same on every rank: the tiny policy's init must agree
    if latest:
        policy = load_policy(latest, dtype=_dtype(cfg, world), device=world.device)
    elif cfg.model:
        policy = load_policy(cfg.model, dtype=_dtype(cfg, world), device=world.device)
    else:
        policy = build_tiny_policy(seed=cfg.seed)
        policy.model.to(device=world.device, dtype=_dtype(cfg, world))
    seed_all(cfg.seed, world.rank)
    if world.is_main:
        if not latest:
            ckpts.clear()
        ckpts.sweep()
    world.barrier()
    items = fit_context(load_items(cfg, purpose="sft"), policy, max_new_tokens=0, reference=True)
    trainer = SFTTrainer(cfg, policy=policy, items=items, run_dir=sdir, log=log.info,
                         metrics_log=open_metrics_log(sdir, fresh=not latest, world=world, cfg=cfg), world=world)
    log.info(f"stage 0 (warm-up SFT): {trainer.total_steps} steps ({len(items)} items, {cfg.sft.epochs} epochs, "
             f"batch {cfg.sft.batch_size}), lr {cfg.sft.lr}, model {cfg.model or 'built-in tiny policy'}")
    if latest:
        trainer.resume_from(latest)
    hist = trainer.train()
    if world.broadcast_object(ckpts.latest()) is None:  # zero steps asked for: still leave a loadable policy
        trainer.save()
    if hist:
        log.info(f"stage 0 done: loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f} in {len(hist)} steps")
    path = ckpts.latest()
    log.info(f"stage 0 policy: {path}")
    return path


def resolve_init_model(cfg, world: World | None = None) -> str:
    """The HF folder stage 1/2 starts from: --model, else the previous stage's latest checkpoint
    (stage 1 builds stage 0 first when there is none)."""
    if cfg.model:
        return cfg.model
    prev = cfg.stage - 1
    path = latest_policy_path(cfg, prev)
    if path:
        return path
    if cfg.stage == 1:
        sft_cfg = warmup_config(cfg)
        log.info(f"no stage-0 policy under {stage_dir(cfg, 0)}: running first the warm-up SFT (stage 0): "
                 f"{_sft_plan(sft_cfg)}, then dataset-level sampling: {_sampling_plan(cfg)}"
                 + (f"; --max-steps {cfg.max_steps} counts stage-1 steps only" if cfg.max_steps is not None else ""))
        path = run_sft(sft_cfg, world)
        setup_logging(stage_dir(cfg), world)
        return path
    raise SystemExit(f"error: no stage-{prev} policy under {stage_dir(cfg, prev)}; run --stage {prev} first or pass --model")


def warmup_config(cfg) -> "C.TrainConfig":
    """The stage-0 config stage 1 runs first when there is no warm-up policy: the preset's stage 0
    with this run's settings (its --sft-* flags, data, seed, device, ...). --max-steps is stage 1's."""
    return dataclasses.replace(C.preset(cfg.preset, 0), output_dir=cfg.output_dir, seed=cfg.seed,
                               device=cfg.device, dtype=cfg.dtype, progress=cfg.progress, data=cfg.data,
                               dist_backend=cfg.dist_backend, cpu_offload=cfg.cpu_offload,
                               gradient_checkpointing=cfg.gradient_checkpointing, sft=cfg.sft,
                               sampling=cfg.sampling, log_every=cfg.log_every, keep_checkpoints=cfg.keep_checkpoints,
                               tensorboard=cfg.tensorboard)


def _sft_plan(cfg) -> str:
    """'N steps (items x epochs / batch)' of a warm-up, before it is built."""
    s = cfg.sft
    if cfg.data:
        return f"{s.epochs} epochs over the --data records in batches of {s.batch_size}"
    steps = s.epochs * -(-s.num_items // s.batch_size)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    return f"{steps} steps ({s.num_items} items x {s.epochs} epochs / batch {s.batch_size}; --sft-items, --sft-epochs, --sft-batch)"


def _sampling_plan(cfg) -> str:
    s = cfg.sampling
    n = "the --data records" if cfg.data else f"{s.num_items} items"
    return f"{n} x k={s.k} (--sampling-items, --sampling-k)"


def _sampling_meta(cfg, init_model: str, items: list) -> dict:
    """What a cached sampling must match to be reused (and the seed it was drawn with)."""
    s = cfg.sampling
    return {"model": os.path.abspath(init_model), "data": cfg.data, "k": s.k, "num_items": len(items),
            "temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}


SAMPLING_SETTINGS = ("temperature", "top_p", "max_new_tokens")


def ensure_sampling(cfg, init_model: str, items: list, world: World | None = None) -> dict:
    """Dataset-level sampling of `items` with the policy at `init_model`, cached in OUT/sampling
    (each rank samples its share of the items; rank 0 writes the merged result)."""
    world = world or World(device=torch.device(cfg.device))
    with hold(os.path.join(cfg.output_dir, "sampling"), world, log=log.warning):  # the cache is shared by stages
        return _ensure_sampling(cfg, init_model, items, world)


def _ensure_sampling(cfg, init_model: str, items: list, world: World) -> dict:
    from pebr.model.policy import load_policy
    from pebr.recipe.splits import read_splits, sample_dataset, write_sampling

    folder = os.path.join(cfg.output_dir, "sampling")
    s = cfg.sampling
    meta = _sampling_meta(cfg, init_model, items)
    cached = read_splits(folder)
    ids = {it.id for it in items}
    why = "none cached"
    if cached is not None:
        cached_meta = cached.get("meta", {})
        cached_ids = set(cached["easy"]) | set(cached["medium"]) | set(cached["hard"])
        differ = [f"{k} {cached_meta.get(k)} (now {meta[k]})" for k in SAMPLING_SETTINGS if cached_meta.get(k) != meta[k]]
        # the same checkpoint reached through a symlink (a run folder linking another's stage0) is the same model
        same_model = isinstance(cached_meta.get("model"), str) and \
            os.path.realpath(cached_meta["model"]) == os.path.realpath(meta["model"])
        if cached_ids != ids:
            why = "its items differ"
        elif cached.get("k") != s.k:
            why = f"it used k={cached.get('k')} (now {s.k})"
        elif not same_model and cfg.stage != 2:
            why = f"it sampled {cached_meta.get('model')}"
        elif differ and cfg.stage != 2:
            why = "it used " + ", ".join(differ)
        else:
            # Stage 1 samples with its starting policy; stage 2 reuses that sampling (the paper samples once).
            log.info(f"dataset-level sampling: cached in {folder}: {cached['counts']}")
            if differ:
                log.info(f"  note: the cached sampling used {', '.join(differ)}; stage 2 reuses stage 1's sampling "
                         f"(delete {folder} to sample again)")
            return cached
        log.info(f"dataset-level sampling cached in {folder} is not reused: {why}")
    log.info(f"dataset-level sampling: {_sampling_plan(cfg)}, T={s.temperature}, top_p {s.top_p}, "
             f"max_new_tokens {cfg.max_new_tokens}, with {init_model}")
    policy = load_policy(init_model, dtype=_dtype(cfg), device=world.device)
    seed_all(cfg.seed, world.rank)  # reproducible splits: the run's seed, a distinct stream per rank
    t0 = time.perf_counter()
    res = sample_dataset(policy, items, k=s.k, temperature=s.temperature, top_p=s.top_p,
                         max_new_tokens=cfg.max_new_tokens, batch_prompts=s.batch_prompts,
                         progress=cfg.progress and world.is_main, world=world)
    if world.is_main:
        write_sampling(res, folder, meta=meta)
    world.barrier()
    log.info(f"dataset-level sampling: {len(items)} items x k={s.k} in {time.perf_counter() - t0:.0f}s: "
             f"{res.counts} -> {folder}")
    return read_splits(folder)


def select_split(cfg, items: list, splits: dict) -> list:
    """Items of the stage's split, topped up from the neighbouring split when smaller than min_split_items."""
    name = cfg.train_split
    if name == "all":
        return items
    by_id = {it.id: it for it in items}
    chosen = [by_id[i] for i in splits[name] if i in by_id]
    order = {"easy": ["medium", "hard"], "medium": ["easy", "hard"], "hard": ["medium", "easy"]}[name]
    if len(chosen) < cfg.min_split_items:
        for other in order:
            extra = [by_id[i] for i in splits[other] if i in by_id]
            need = cfg.min_split_items - len(chosen)
            if need <= 0:
                break
            log.info(f"split {name!r} holds {len(chosen)} items (< {cfg.min_split_items}): adding {min(need, len(extra))} {other!r} items")
            chosen += extra[:need]
    if not chosen:
        raise SystemExit(f"error: the {name!r} split is empty; pass --split all or --min-split-items N")
    return chosen


def make_reward_fn(cfg):
    """reward_fn(text, item, num_tokens) -> dict for the stage: perception (1) or reasoning (2)."""
    from pebr import rewards

    if cfg.stage == 1:
        scorer = rewards.ClipScorer.from_pretrained(cfg.clip_model, device=cfg.device) if cfg.clip_model else None
        weights = rewards.PerceptionWeights()
        return lambda text, item, k: rewards.perception_reward(text, item, num_tokens=k, weights=weights, scorer=scorer)
    weights = rewards.ReasoningWeights()
    return lambda text, item, k: rewards.reasoning_reward(text, item, weights=weights)


def run_grpo(cfg, world: World | None = None) -> str:
    """Stage 1 or 2 -> path of the final checkpoint."""
    world = world or World(device=torch.device(cfg.device))
    setup_logging(stage_dir(cfg), world)
    with hold(stage_dir(cfg), world, log=log.warning):  # one run per stage folder (pebr.run.lock)
        return _run_grpo(cfg, world)


def _run_grpo(cfg, world: World) -> str:
    from pebr.run.checkpoint import Checkpointer, load_trainer_state
    from pebr.trainers.grpo import GRPOTrainer
    from pebr.model.policy import load_policy

    sdir = stage_dir(cfg)
    log.info(describe_machine(world.device))
    ckpts = Checkpointer(os.path.join(sdir, "checkpoints"), keep=cfg.keep_checkpoints)
    latest = world.broadcast_object(ckpts.latest() if cfg.resume else None)
    if cfg.resume and not latest:
        log.info(f"--resume: no checkpoint under {ckpts.root}; starting fresh")
    init_model = load_trainer_state(latest)["init_model"] if latest else resolve_init_model(cfg, world)
    from pebr.model.context_limits import text_only_policy

    items = fit_context(load_items(cfg, purpose="rl"), text_only_policy(init_model), max_new_tokens=cfg.max_new_tokens)
    splits = ensure_sampling(cfg, init_model, items, world)
    train_items = select_split(cfg, items, splits)
    seed_all(cfg.seed, world.rank)
    policy = load_policy(latest or init_model, dtype=_dtype(cfg, world), device=world.device)
    reference = None
    if cfg.kl_coef > 0:  # the frozen starting policy of this stage
        reference = load_policy(init_model, dtype=_dtype(cfg, world), device=world.device)
        reference.model.eval().requires_grad_(False)
    if world.is_main:
        if not latest:
            ckpts.clear()
        ckpts.sweep()
        with open(os.path.join(sdir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    world.barrier()
    trainer = GRPOTrainer(cfg, policy=policy, reference=reference, items=train_items, reward_fn=make_reward_fn(cfg),
                          run_dir=sdir, init_model=init_model, log=log.info,
                          metrics_log=open_metrics_log(sdir, fresh=not latest, world=world, cfg=cfg), world=world)
    log.info(f"stage {cfg.stage} ({C.STAGE_NAMES[cfg.stage]}): {trainer.total_steps} steps, "
             f"{len(train_items)} items (split {cfg.train_split!r}), "
             f"from {init_model}; n={cfg.group_size}, {cfg.rollout_batch} prompts/step, lr {cfg.lr}, "
             f"T={cfg.temperature}, max_new_tokens {cfg.max_new_tokens}, {world.world_size} rank(s)")
    if latest:
        trainer.resume_from(latest)
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


def run(cfg, world: World | None = None) -> str:
    """Run one stage -> path of the policy it produced."""
    t0 = time.perf_counter()
    path = run_sft(cfg, world) if cfg.stage == 0 else run_grpo(cfg, world)
    log.info(f"wall time {time.perf_counter() - t0:.0f}s")
    return path


