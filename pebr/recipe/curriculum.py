"""The paper's ablation (`python -m pebr.experiment curriculum`). Does perception
GRPO before reasoning GRPO help, against reasoning GRPO alone and one GRPO stage on both rewards?

    python -m pebr.experiment curriculum --output-dir runs/curriculum      # 5 seeds x 300 steps, hours on a CPU
    python -m pebr.experiment curriculum --plan                           # what it can detect, how long: then stop

One warm-up (stage 0) and one dataset-level sampling are shared by every arm and seed. Then, for
each seed s (the GRPO data order and rollout sampling), N GRPO steps per arm:

    a  stage2          reasoning GRPO, N steps, medium split, from the warm-up
    b  stage1_stage2   perception GRPO N//2 steps (easy split) from the warm-up, then reasoning
                       GRPO N - N//2 steps (medium split) from that stage's final checkpoint
    c  union           one GRPO stage, N steps on the easy + medium items, union reward:
                       overall = (perception overall + reasoning overall) / 2
                               = 0.2 scene|clip + 0.2 keyword + 0.05 length + 0.45 accuracy + 0.1 format

Every stage takes the preset's GRPO settings of its stage (the union stage those of stage 2) and
its KL reference is its own starting policy, as in `python -m pebr.train`. Each final policy and
the warm-up are then evaluated greedily on one held-out set of built-in items (seed 999 unless
--eval-seed; the SFT pool uses seed 2, the sampled pool seed 1; an item equal to a training item
is dropped and counted). Per arm: perception and reasoning accuracy per seed with their Wilson
interval, their mean over seeds with a Student t interval (pebr.report.stats). What decides: arm b
against a and against c on the same items, per kind and per task type: per seed McNemar's exact
test, pooled over the seeds the exact paired test, with a bootstrap interval (pebr.report.paired).
Before it starts it prints the power statement (the smallest difference these items x seeds detect
at 80% power) and the time it will take (pebr.recipe.curriculum_plan).

OUT (--output-dir) holds:
    warmup/stage0/          the warm-up (unless --warmup names one)
    sampling/               the shared sampling (splits.json), as pebr.train writes it
    eval/warmup/            the warm-up's held-out eval
    <arm>/seed<s>/<stage>/  each GRPO stage: checkpoints/, metrics.jsonl, train.log, config.json, stage.json
    <arm>/seed<s>/eval/     held-out responses (heldout.jsonl) and summary (heldout.summary.json)
    curriculum.md / .png / .json   the tables, the chart (accuracies; b - a and b - c), everything
A killed run resumes: a stage whose final checkpoint exists is skipped (a partial one continues
from its latest checkpoint), and an eval already written for the same items is reused.
docs/recipe.md#the-curriculum-ablation describes the ablation.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from pebr.data import tasks
from pebr.errors import ConfigError, DataError
from pebr.recipe import config as C
from pebr.recipe.builder import (
    build_grpo_trainer,
    load_rollout_policy,
    make_reward_fn,
    resume_point,
)
from pebr.recipe.evaluate import evaluate
from pebr.recipe.items import SFT_SEED, fit_context, load_items
from pebr.recipe.paths import latest_policy_path
from pebr.recipe.runner import grpo_summary, run_sft
from pebr.recipe.splits import ensure_sampling, select_split
from pebr.report.curriculum_report import (
    aggregate,
    kind_scores,
    markdown,
    paired_results,
    plot,
)
from pebr.rewards import UNION_FORMULA
from pebr.run.checkpoint import load_trainer_state
from pebr.run.distributed import World
from pebr.run.lock import hold
from pebr.run.log_setup import stage_log
from pebr.run.model_path import resolve_model_path

log = logging.getLogger("pebr")


# ---- the arms


@dataclass(frozen=True)
class Stage:
    """One GRPO stage of an arm."""

    name: str  # its folder under OUT/<arm>/seed<s>/
    stage: int  # the preset stage whose GRPO settings it takes (1 perception, 2 reasoning)
    reward: str  # "perception", "reasoning" or "union"
    split: str  # the sampled items it trains on: "easy", "medium" or "easy+medium"


@dataclass(frozen=True)
class Arm:
    key: str  # a, b, c
    folder: str  # OUT/<folder>
    label: str  # what the table says
    stages: tuple[Stage, ...]

    def steps(self, total: int) -> list[int]:
        """GRPO steps per stage: `total` in all, split evenly (the first stage takes the smaller half)."""
        k = len(self.stages)
        return [total // k + (1 if i >= k - total % k else 0) for i in range(k)]


ARMS = (
    Arm("a", "a_stage2", "stage 2 alone", (Stage("stage2", 2, "reasoning", "medium"),)),
    Arm("b", "b_stage1_stage2", "stage 1 then stage 2",
        (Stage("stage1", 1, "perception", "easy"), Stage("stage2", 2, "reasoning", "medium"))),
    Arm("c", "c_union", "one stage, union reward", (Stage("union", 2, "union", "easy+medium"),)),
)


@dataclass
class CurriculumConfig:
    """`python -m pebr.experiment curriculum`: the ablation's own settings (the training settings
    come from --preset and the override flags)."""

    seeds: int = C.opt(5, "GRPO seeds per arm (data order and rollout sampling; warm-up and sampling are shared). "
                          "5 x 1,050 held-out reasoning items detect a 3-point difference at 80% power even at "
                          "the pilot's discordance bound (pebr/recipe/curriculum_plan.py)")
    steps: int = C.opt(300, "GRPO steps per arm (arm b: half perception, half reasoning): 300 makes each of b's "
                            "stages as long as the tiny preset's default stage (150); every arm runs as many")
    output_dir: str = C.opt("runs/curriculum", "the experiment folder (rerun with the same one to resume)")
    eval_items: int = C.opt(2100, "held-out built-in items (half perception, half reasoning), decoded greedily: "
                                  "2,100 leaves 1,000+ of each kind after those equal to a training item are dropped")
    eval_seed: int = C.opt(999, "seed of the held-out items: must differ from the SFT pool's (2) and the sampled pool's (1)")
    preset: str = C.opt("tiny", "training settings of every stage (pebr.recipe.config)", choices=tuple(C.PRESETS))
    warmup: str | None = C.opt(None, "warm-up policy to start from (HF folder, stage folder or checkpoints folder); "
                                     "none: OUT/warmup/stage0, trained first when it holds no finished warm-up")
    device: str | None = C.opt(None, "cpu, cuda or cuda:N; none: cuda when available, else cpu")
    pilot_discordance: float | None = C.opt(None, "share of held-out items two arms grade differently, for the power "
                                                  "statement; none: measured on the arms OUT already holds, else the "
                                                  "pilot's bound (pebr/recipe/curriculum_plan.py)")
    plan: bool = C.opt(False, "print the power statement and the time it would take, then stop")

    def __post_init__(self):
        C.check_choices(self)
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 (arm b runs two stages), got {self.steps}")
        if self.eval_items < 1:
            raise ValueError(f"eval_items must be >= 1, got {self.eval_items}")
        if self.pilot_discordance is not None and not 0.0 < self.pilot_discordance <= 1.0:
            raise ValueError(f"pilot_discordance must be in (0, 1], got {self.pilot_discordance}")


# TrainConfig fields the command line may override, for every stage alike (flags as in pebr.train).
_TRAIN_FLAGS = ("difficulty", "group_size", "rollout_batch", "mini_batch", "micro_batch", "max_new_tokens", "lr", "kl_coef",
                "temperature", "min_split_items", "clip_model", "dtype", "save_every", "log_every", "progress")
_SFT_FLAGS = ("num_items", "epochs", "batch_size")
_SAMPLING_FLAGS = ("num_items", "k")


@dataclass
class Overrides:
    """The given training flags: {field: value} for TrainConfig, its SFTConfig and its SamplingConfig."""

    train: dict
    sft: dict
    sampling: dict


def stage_config(cc: CurriculumConfig, over: Overrides, *, stage: int, seed: int, output_dir: str,
                 max_steps: int | None = None) -> C.TrainConfig:
    """The preset's config of `stage` with the overrides, applied as pebr.train applies its flags
    (TrainConfig.with_overrides), then this arm's seed, folder and steps."""
    cfg = C.preset(cc.preset, stage).with_overrides(train=over.train, sft=over.sft, sampling=over.sampling)
    return dataclasses.replace(cfg, seed=seed, output_dir=output_dir, device=cc.device, resume=True,
                               max_steps=max_steps if stage else None)


# ---- rewards and items


def stage_items(cfg, split: str, items: list, splits: dict) -> list:
    """The sampled items a stage trains on: one split via pebr.recipe.splits.select_split (topped up to
    min_split_items), or easy + medium in pool order, topped up from hard."""
    if split != "easy+medium":
        return select_split(dataclasses.replace(cfg, split=split), items, splits)
    wanted = set(splits["easy"]) | set(splits["medium"])
    chosen = [it for it in items if it.id in wanted]
    hard = [it for it in items if it.id in set(splits["hard"])]
    need = cfg.min_split_items - len(chosen)
    if need > 0 and hard:
        log.info(f"easy + medium hold {len(chosen)} items (< {cfg.min_split_items}): adding {min(need, len(hard))} hard items")
        chosen += hard[:need]
    if not chosen:
        raise ConfigError("the easy and medium splits are empty; pass --min-split-items N")
    return chosen


def _content(item) -> tuple:
    return item.task_type, item.problem, item.answer, json.dumps(item.scene, sort_keys=True)


def check_eval_seed(cc: CurriculumConfig, cfg) -> None:
    """ValueError when --eval-seed is the seed of a training pool (the SFT items' or the sampled items')."""
    used = {SFT_SEED: "SFT", cfg.sampling.seed: "sampled"}
    if cc.eval_seed in used:
        raise ConfigError(f"--eval-seed {cc.eval_seed} is the {used[cc.eval_seed]} pool's seed; pick another")


def held_out_items(cc: CurriculumConfig, sft_cfg, pool: list) -> tuple[list, dict]:
    """Built-in items of --eval-seed, less any equal to an item of the SFT pool or the sampled pool
    -> (items, info for the JSON)."""
    check_eval_seed(cc, sft_cfg)
    level = sft_cfg.difficulty
    seen = {_content(it) for it in tasks.generate_items(sft_cfg.sft.num_items, seed=SFT_SEED, kind="mixed",
                                                        difficulty=level, image_size=sft_cfg.item_image_size)}
    seen |= {_content(it) for it in pool}
    drawn = tasks.generate_items(cc.eval_items, seed=cc.eval_seed, kind="mixed", difficulty=level, image_size=sft_cfg.item_image_size)
    items = [it for it in drawn if _content(it) not in seen]
    ids = "\n".join(it.id for it in items)
    info = {"source": "procedural", "kind": "mixed", "seed": cc.eval_seed, "difficulty": level, "drawn": len(drawn), "n": len(items),
            "dropped_equal_to_training_items": len(drawn) - len(items),
            "ids_digest": hashlib.sha1(ids.encode()).hexdigest()[:16]}
    if not items:
        raise DataError("every held-out item equals a training item")
    return items, info


# ---- running


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def _write_json(path: str, doc) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_plain(doc), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def _plain(x):
    """JSON-safe: nan and inf become None (the mean interval of one seed is nan)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _same_path(a, b) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def train_stage(cfg, spec: Stage, *, sdir: str, init_model: str, items: list, world, record: dict) -> dict:
    """Run one GRPO stage into `sdir` (or skip it when its final checkpoint is there) -> its record:
    {"final", "trained_now", "wall_s", "steps", "init_model", ...}. Built by pebr.recipe.builder, as
    pebr.train builds a stage, with the arm's items, reward and starting policy."""
    ckpts, latest = resume_point(cfg, sdir, world)  # cfg.resume is set: a killed arm continues
    if latest:
        state = load_trainer_state(latest)
        why = None
        if not _same_path(state.get("init_model"), init_model):
            why = f"it started from {state.get('init_model')}, not {init_model}"
        elif (state.get("config") or {}).get("max_steps") != cfg.max_steps:
            why = f"it runs {(state.get('config') or {}).get('max_steps')} steps, not {cfg.max_steps}"
        if why:
            raise ConfigError(f"{sdir} holds another run ({why}): remove it or pick another --output-dir")
        if int(state["step"]) >= cfg.max_steps:
            done = _read_json(os.path.join(sdir, "stage.json")) or {}
            log.info(f"{sdir}: finished earlier ({latest}); skipped")
            return {**record, "wall_s": done.get("wall_s"), **{k: v for k, v in done.items() if k != "trained_now"},
                    "final": latest, "trained_now": False}
    t0 = time.perf_counter()
    with stage_log(sdir, world), hold(sdir, world, log=log.warning):
        trainer = build_grpo_trainer(cfg, world, sdir=sdir, checkpoints=ckpts, latest=latest, init_model=init_model,
                                     items=items, reward_fn=make_reward_fn(cfg, spec.reward),
                                     config={**cfg.to_dict(), "experiment": record})
        log.info(f"{record['arm']} seed {cfg.seed} {spec.name}: {trainer.total_steps} steps, {spec.reward} reward, "
                 f"{len(items)} items ({spec.split}), from {init_model}")
        hist = trainer.train()
        if hist:
            log.info(f"{spec.name} done: " + grpo_summary(hist))
        final = ckpts.latest()
    out = {**record, "final": final, "trained_now": True, "wall_s": time.perf_counter() - t0,
           "resumed_from": latest}
    _write_json(os.path.join(sdir, "stage.json"), out)
    return out


def _records_readable(folder: str, n) -> bool:
    """heldout.jsonl holds the n records its summary counts: a truncated or damaged file is evaluated again
    (the paired comparison reads every record)."""
    try:
        return len(read_outcomes(folder)) == n
    except DataError:
        return False


def eval_cached(model: str, items: list, info: dict, *, folder: str, max_new_tokens: int, world,
                rollout_engine: str = "hf") -> dict:
    """Greedy held-out eval of `model` (pebr.recipe.evaluate.evaluate), written to folder/heldout.*, or the
    one written there before for the same model, items and budget -> the summary (with "reused", "wall_s")."""
    path = os.path.join(folder, "heldout.summary.json")
    key = {"model": os.path.realpath(model), "items": info, "max_new_tokens": max_new_tokens, "temperature": 0.0}
    old = _read_json(path)
    if old is not None and old.get("key") == _plain(key) and _records_readable(folder, old.get("n")):
        return {**old, "reused": True}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    policy, engine = load_rollout_policy(model, device=world.device, rollout_engine=rollout_engine)
    summary, records = evaluate(policy, items, max_new_tokens=max_new_tokens, temperature=0.0, engine=engine)
    del policy, engine
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "heldout.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    doc = {"key": key, "model": model, **summary, "wall_s": time.perf_counter() - t0}
    _write_json(path, doc)
    return {**_plain(doc), "reused": False}


# ---- the experiment


def read_outcomes(folder: str) -> dict[str, dict]:
    """folder/heldout.jsonl (eval_cached writes it) -> {item id: {"correct", "kind", "task_type"}}.
    DataError naming the file when it is missing or a line is not a record: the paired comparison
    needs every arm's items."""
    path = os.path.join(folder, "heldout.jsonl")
    out, n = {}, 0
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                r = json.loads(line)
                out[str(r["id"])] = {"correct": bool(r["correct"]), "kind": r.get("kind"), "task_type": r.get("task_type")}
    except OSError as exc:
        raise DataError(f"{path}: {exc.strerror or exc}; remove {folder} to evaluate again") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}, line {n}: not an eval record ({exc}); remove {folder} to evaluate again") from exc
    return out


def run_curriculum(cc: CurriculumConfig, over: Overrides, *, command: str, plan: dict | None = None) -> dict:
    """The whole ablation -> the result written to OUT/curriculum.json (and .md, .png).
    plan: the power statement said before the run (pebr.recipe.curriculum_plan), kept in the result."""
    from pebr.model.context_limits import text_only_policy

    t_start, started = time.perf_counter(), datetime.datetime.now().isoformat(timespec="seconds")
    out = cc.output_dir
    world = World(device=torch.device(cc.device))
    os.makedirs(out, exist_ok=True)
    with stage_log(out, world), hold(out, world, log=log.warning):  # one experiment per folder
        log.info(f"curriculum ablation: {command}")
        base = stage_config(cc, over, stage=1, seed=0, output_dir=out)
        t0 = time.perf_counter()
        if cc.warmup:
            try:
                warmup = resolve_model_path(cc.warmup)
            except ValueError as exc:
                raise ConfigError(f"--warmup: {exc}") from exc
            reused = True
        else:
            wdir = os.path.join(out, "warmup")
            reused = latest_policy_path(dataclasses.replace(base, output_dir=wdir), 0) is not None
            warmup = run_sft(stage_config(cc, over, stage=0, seed=0, output_dir=wdir), world)
        warmup_rec = {"path": warmup, "reused": reused, "wall_s": time.perf_counter() - t0}

        t0 = time.perf_counter()
        pool = fit_context(load_items(base, purpose="rl"), text_only_policy(warmup), max_new_tokens=base.max_new_tokens)
        splits = ensure_sampling(base, warmup, pool, world)
        sampling_rec = {"folder": os.path.join(out, "sampling"), "counts": splits["counts"],
                        "wall_s": time.perf_counter() - t0}

        held, held_info = held_out_items(cc, base, pool)
        eval_s = 0.0

        def run_eval(model, folder):
            nonlocal eval_s
            summary = eval_cached(model, held, held_info, folder=folder, max_new_tokens=base.max_new_tokens, world=world,
                                  rollout_engine=base.rollout_engine)
            if not summary["reused"]:
                eval_s += summary["wall_s"]
            return {**kind_scores(summary), "overall": {k: summary[k] for k in ("accuracy", "n", "correct", "lo", "hi")},
                    "summary": os.path.join(folder, "heldout.summary.json"), "reused": summary["reused"]}

        warmup_eval = run_eval(warmup, os.path.join(out, "eval", "warmup"))
        per_arm = {a.key: [] for a in ARMS}
        outcomes = {a.key: [] for a in ARMS}  # arm -> one {item id: record} per seed, for the paired comparison
        for seed in range(cc.seeds):
            for arm in ARMS:
                adir = os.path.join(out, arm.folder, f"seed{seed}")
                start, recs = warmup, []
                for spec, n in zip(arm.stages, arm.steps(cc.steps)):
                    cfg = stage_config(cc, over, stage=spec.stage, seed=seed, output_dir=adir, max_steps=n)
                    items = stage_items(cfg, spec.split, pool, splits)
                    record = {"arm": arm.key, "seed": seed, "name": spec.name, "stage": spec.stage, "steps": n,
                              "reward": spec.reward, "split": spec.split, "items": len(items), "init_model": start,
                              "command": command}
                    rec = train_stage(cfg, spec, sdir=os.path.join(adir, spec.name), init_model=start, items=items,
                                      world=world, record=record)
                    recs.append(rec)
                    start = rec["final"]
                ev = run_eval(start, os.path.join(adir, "eval"))
                outcomes[arm.key].append(read_outcomes(os.path.join(adir, "eval")))
                log.info(f"arm {arm.key} seed {seed}: perception {ev['perception']['accuracy']:.3f}, "
                         f"reasoning {ev['reasoning']['accuracy']:.3f} ({ev['perception']['n']} + "
                         f"{ev['reasoning']['n']} held-out items)")
                per_arm[arm.key].append({"seed": seed, "final": start, "stages": recs,
                                         "wall_s": sum(r["wall_s"] or 0.0 for r in recs), "eval": ev})

        arms = {}
        for arm in ARMS:
            runs = per_arm[arm.key]
            arms[arm.key] = {"label": arm.label, "folder": arm.folder,
                             "stages": [{"name": sp.name, "steps": n, "reward": sp.reward, "split": sp.split}
                                        for sp, n in zip(arm.stages, arm.steps(cc.steps))],
                             "per_seed": runs, **aggregate([r["eval"] for r in runs])}
        result = {"command": command, "started": started, "wall_s": time.perf_counter() - t_start,
                  "settings": {**dataclasses.asdict(cc), "device": cc.device, "max_new_tokens": base.max_new_tokens,
                               "overrides": dataclasses.asdict(over)},
                  "union_reward": UNION_FORMULA, "warmup": warmup_rec, "sampling": sampling_rec,
                  "held_out": held_info, "eval_wall_s": eval_s, "warmup_eval": warmup_eval, "arms": arms,
                  "paired": paired_results(outcomes), "plan": plan}
        result = _plain(result)
        _write_json(os.path.join(out, "curriculum.json"), result)
        with open(os.path.join(out, "curriculum.md"), "w") as f:
            f.write(markdown(result))
        plot(result, os.path.join(out, "curriculum.png"))
        log.info(f"curriculum ablation done in {result['wall_s']:.0f}s: {os.path.join(out, 'curriculum.md')}")
    return result
