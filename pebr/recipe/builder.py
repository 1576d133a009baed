"""One way to build a stage, for every command: the policy and its reference, the items, the reward,
the rollout engine and the trainer. `pebr.train` (recipe/runner.py), `pebr.experiment`
(recipe/curriculum.py), `pebr.sample` and `pebr.eval` all load through here, so a rule (the dtype a
sharded run loads in, the reference being the frozen starting policy, rank 0 alone touching the
stage folder) is written once.

    ckpts, latest = resume_point(cfg, sdir, world)
    trainer = build_grpo_trainer(cfg, world, sdir=sdir, checkpoints=ckpts, latest=latest,
                                 init_model=init, items=train_items, reward_fn=make_reward_fn(cfg))
    trainer.train()
"""
from __future__ import annotations

import json
import logging
import os

import torch

from pebr.errors import CheckpointError, ConfigError
from pebr.recipe.config import TrainConfig
from pebr.run.checkpoint import Checkpointer, load_trainer_state
from pebr.run.metrics_log import open_stage_metrics

log = logging.getLogger("pebr")

REWARD_KINDS = ("perception", "reasoning", "union")


def param_dtype(cfg: TrainConfig, world=None) -> torch.dtype:
    """The dtype parameters are loaded in. Sharded (FSDP2) runs keep fp32 master weights and
    compute in bf16 through MixedPrecisionPolicy when --dtype bfloat16 (pebr.run.fsdp.shard_model)."""
    if world is not None and world.distributed:
        return torch.float32
    return getattr(torch, cfg.dtype)


def load_stage_policy(path: str, cfg: TrainConfig, world=None, *, device=None):
    """The Policy at HF folder `path`, in the stage's dtype, on `device` (default: the world's)."""
    from pebr.model.policy import load_policy

    device = device if device is not None else world.device if world is not None else torch.device(cfg.device)
    return load_policy(path, dtype=param_dtype(cfg, world), device=device)


def load_trained_policy(cfg: TrainConfig, world, *, init_model: str, latest: str | None):
    """The policy a stage trains: from `latest` when resuming, else `init_model`. With LoRA
    (--lora-rank) the base is always `init_model`, adapted (pebr.model.lora) and, when resuming,
    given the adapter saved with `latest`: the frozen base never changes within a stage."""
    if not cfg.lora.enabled:
        return load_stage_policy(latest or init_model, cfg, world)
    import dataclasses

    from pebr.model.lora import ADAPTER_DIR, add_lora, load_adapter_weights

    policy = load_stage_policy(init_model, cfg, world)
    lora = cfg.lora
    adapter = add_lora(policy.model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets,
                       vision=lora.vision)
    policy = dataclasses.replace(policy, adapter=adapter, base_path=os.path.realpath(init_model))
    if latest:
        try:
            load_adapter_weights(adapter, os.path.join(latest, ADAPTER_DIR))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"--resume: the adapter of {latest} does not load ({exc})") from None
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.model.parameters())
    log.info(f"LoRA rank {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.targets)}"
             f"{' and the vision blocks' if lora.vision else ''}: {trainable:,} of {total:,} parameters train "
             f"({100 * trainable / total:.2f}%); the base {init_model} is frozen and is the KL reference")
    return policy


def load_rollout_policy(path: str, *, device, rollout_engine: str = "hf"):
    """What pebr.sample and pebr.eval generate with: the Policy at HF folder `path` (fp32, unsharded,
    on `device`) and the rollout engine `rollout_engine` on it (pebr.rollout.factory)."""
    from pebr.model.policy import load_policy
    from pebr.rollout.factory import build_rollout_engine

    policy = load_policy(path, device=device)
    return policy, build_rollout_engine(rollout_engine, policy)


def load_reference(init_model: str, cfg: TrainConfig, world=None):
    """The KL reference of a GRPO stage: its starting policy, frozen; None when kl_coef is 0, and
    with LoRA, whose reference is the policy's own base with the adapters off (no second model)."""
    if cfg.kl_coef <= 0 or cfg.lora.enabled:
        return None
    reference = load_stage_policy(init_model, cfg, world)
    reference.model.eval().requires_grad_(False)
    return reference


def make_reward_fn(cfg: TrainConfig, kind: str | None = None):
    """reward_fn(text, item, num_tokens) -> dict with "overall". kind: "perception" (stage 1's
    default), "reasoning" (stage 2's) or "union" (both, averaged: pebr.rewards.union_reward)."""
    from pebr import rewards

    kind = kind or ("perception" if cfg.stage == 1 else "reasoning")
    if kind == "perception":
        scorer = rewards.ClipScorer.from_pretrained(cfg.clip_model, device=cfg.device) if cfg.clip_model else None
        weights = rewards.PerceptionWeights()
        return lambda text, item, k: rewards.perception_reward(text, item, num_tokens=k, weights=weights, scorer=scorer)
    if kind == "reasoning":
        weights = rewards.ReasoningWeights()
        return lambda text, item, k: rewards.reasoning_reward(text, item, weights=weights)
    if kind == "union":
        perception, reasoning = make_reward_fn(cfg, "perception"), make_reward_fn(cfg, "reasoning")
        return lambda text, item, k: rewards.union_reward(perception(text, item, k), reasoning(text, item, k))
    raise ValueError(f"reward kind must be one of {', '.join(REWARD_KINDS)}, got {kind!r}")


def resume_point(cfg: TrainConfig, sdir: str, world) -> tuple[Checkpointer, str | None]:
    """The stage's checkpoints and, with --resume, the latest one to continue from (the same on every rank)."""
    ckpts = Checkpointer(os.path.join(sdir, "checkpoints"), keep=cfg.keep_checkpoints)
    latest = world.broadcast_object(ckpts.latest() if cfg.resume else None)
    if cfg.resume and not latest:
        damaged = ckpts.unverified()
        if damaged:  # starting fresh would throw the run away: say why instead
            raise CheckpointError(f"--resume: no checkpoint under {ckpts.root} verifies ("
                                  + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in damaged[:3])
                                  + "); restore the files, or run without --resume to start the stage again")
        log.info(f"--resume: no checkpoint under {ckpts.root}; starting fresh")
    if latest:
        check_resume(cfg, latest)
    return ckpts, latest


def check_resume(cfg: TrainConfig, latest: str) -> None:
    """ConfigError naming each flag whose value differs from the checkpoint's run (pebr.recipe.config
    .resume_changes), and --model naming another starting policy than the one the run started from:
    a resumed run computes what the run it continues did, and records what it runs. With
    --allow-changed-settings each difference is logged instead and the run goes on with the new
    values (recorded by the trainer: _record_changes); the weights' shapes (RESUME_SHAPE_FIELDS)
    cannot change either way."""
    lines, _, fixed = _differences(cfg, latest)
    if not lines:
        return
    if not cfg.allow_changed_settings:
        raise ConfigError(f"--resume from {latest}: {'; '.join(lines)}; resume with the run's own settings, "
                          f"start the stage again without --resume, or pass --allow-changed-settings to go on "
                          f"with the new values")
    if fixed:
        raise ConfigError(f"--resume from {latest}: {'; '.join(fixed)}: the checkpoint's weights have the shapes its "
                          f"own values give, so --allow-changed-settings cannot change them; start the stage again "
                          f"without --resume")
    for line in lines:
        log.warning(f"--resume --allow-changed-settings: {line}: going on with the new value")


def _differences(cfg: TrainConfig, latest: str) -> tuple[list[str], list[dict], list[str]]:
    """How a resumed run's settings differ from its checkpoint's -> (one line each, {"flag", "from",
    "to"} each, the lines of those that set the weights' shapes)."""
    from pebr.recipe.config import RESUME_SHAPE_FIELDS, resume_changes

    state = load_trainer_state(latest)
    changes = resume_changes(cfg, state.get("config") or {})
    lines = [str(c) for c in changes]
    records = [{"flag": c.flag, "from": c.old, "to": c.new} for c in changes]
    started = state.get("init_model") if cfg.stage else (state.get("config") or {}).get("model")
    if cfg.model and (started is None or os.path.realpath(cfg.model) != os.path.realpath(started)):
        lines.append(f"--model {cfg.model} (the run being resumed started from "
                     f"{started or 'a policy built at random init'})")
        records.append({"flag": "--model", "from": started, "to": cfg.model})
    return lines, records, [str(c) for c in changes if c.field in RESUME_SHAPE_FIELDS]


def resumed_init_model(cfg: TrainConfig, latest: str) -> str | None:
    """The starting policy of a resumed stage (its KL reference, its LoRA base): the one its
    checkpoint records, or --model where --allow-changed-settings lets it change."""
    if cfg.allow_changed_settings and cfg.model:
        return cfg.model
    return load_trainer_state(latest).get("init_model")


def _record_changes(trainer, cfg: TrainConfig, latest: str) -> None:
    """A resumed trainer's record of the settings --allow-changed-settings let change, kept in every
    checkpoint it saves (trainer_state.json "settings_changed": one entry per such resume)."""
    records = _differences(cfg, latest)[1] if cfg.allow_changed_settings else []
    if records:
        trainer.settings_changed.append({"step": trainer.step, "changed": records})


def prepare_stage_folder(sdir: str, ckpts: Checkpointer, *, latest: str | None, world, config: dict | None) -> None:
    """Rank 0: a fresh run clears old checkpoints, every run sweeps half-written ones, and writes
    config.json (when given); the other ranks wait for it."""
    if world.is_main:
        if not latest:
            ckpts.clear()
        ckpts.sweep()
        if config is not None:  # under a hidden name first: a signal or a full disk never leaves half of it
            tmp = os.path.join(sdir, ".config.json.tmp")
            try:
                with open(tmp, "w") as f:
                    json.dump(config, f, indent=1)
                os.replace(tmp, os.path.join(sdir, "config.json"))
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
    world.barrier()


def build_grpo_trainer(cfg: TrainConfig, world, *, sdir: str, checkpoints: Checkpointer, latest: str | None,
                       init_model: str, items: list, reward_fn, config: dict | None = None):
    """A GRPO stage ready to train: the policy (from `latest` when resuming, else `init_model`), its
    frozen reference, the stage folder prepared, the metrics file, and the trainer resumed."""
    from pebr.run.distributed import seed_all
    from pebr.trainers.grpo import GRPOTrainer

    seed_all(cfg.seed, world.rank)
    policy = load_trained_policy(cfg, world, init_model=init_model, latest=latest)
    reference = load_reference(init_model, cfg, world)
    prepare_stage_folder(sdir, checkpoints, latest=latest, world=world, config=cfg.to_dict() if config is None else config)
    trainer = GRPOTrainer(cfg, policy=policy, reference=reference, items=items, reward_fn=reward_fn, run_dir=sdir,
                          init_model=init_model, log=log.info, world=world,
                          metrics_log=open_stage_metrics(sdir, fresh=not latest, world=world, tensorboard=cfg.tensorboard))
    if latest:
        trainer.resume_from(latest)
        _record_changes(trainer, cfg, latest)
    return trainer


def build_sft_trainer(cfg: TrainConfig, world, *, sdir: str, checkpoints: Checkpointer, latest: str | None):
    """The warm-up (stage 0) ready to train: the policy (from `latest`, --model, or built at random
    init: the tiny one or a real width, --model-size), its items (those that fit the context), the folder prepared, the trainer resumed."""
    from pebr.model.policy import build_tiny_policy
    from pebr.model.sizes import build_sized_policy
    from pebr.recipe.items import fit_context, load_items
    from pebr.run.distributed import seed_all
    from pebr.trainers.sft import SFTTrainer

    seed_all(cfg.seed)  # the same on every rank: the tiny policy's init must agree
    if cfg.lora.enabled:
        # LoRA adapts a pretrained base; the base of a resumed run is the one it started from
        saved = (load_trainer_state(latest).get("config") or {}) if latest else {}
        base = cfg.model or saved.get("model")
        if not base:
            raise ConfigError("--lora-rank at stage 0 needs --model: LoRA adapts a pretrained base, and a policy "
                              "built at random init has nothing to adapt (drop --lora-rank to train it whole)")
        policy = load_trained_policy(cfg, world, init_model=base, latest=latest)
    elif latest or cfg.model:
        policy = load_stage_policy(latest or cfg.model, cfg, world)
    else:
        if cfg.model_size == "tiny":
            policy = build_tiny_policy(seed=cfg.seed)
        else:
            policy = build_sized_policy(cfg.model_size, text_layers=cfg.text_layers, vision_blocks=cfg.vision_blocks,
                                        seed=cfg.seed, image_size=cfg.item_image_size)
        policy.model.to(device=world.device, dtype=param_dtype(cfg, world))
    seed_all(cfg.seed, world.rank)
    prepare_stage_folder(sdir, checkpoints, latest=latest, world=world, config=None)
    items = fit_context(load_items(cfg, purpose="sft"), policy, max_new_tokens=0, reference=True)
    trainer = SFTTrainer(cfg, policy=policy, items=items, run_dir=sdir, log=log.info, world=world,
                         metrics_log=open_stage_metrics(sdir, fresh=not latest, world=world, tensorboard=cfg.tensorboard))
    if latest:
        trainer.resume_from(latest)
        _record_changes(trainer, cfg, latest)
    return trainer
