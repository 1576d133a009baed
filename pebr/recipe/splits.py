"""Dataset-level sampling: k rollouts per item, scored by accuracy, split by difficulty; its cache
in OUT/sampling; the split a stage trains on.

    result = sample_dataset(policy, items, k=8, temperature=1.2, top_p=0.99, max_new_tokens=256)
    result.splits["easy"]      # ids of items with k/k correct; "medium": 1..k-1; "hard": 0
    write_sampling(result, folder, meta=sampling_meta(...))   # rollouts.jsonl + splits.json
    splits = ensure_sampling(cfg, init_model, items, world)   # the stages: sampled once, then cached
    train_items = select_split(cfg, items, splits)

The paper trains perception on easy items (their answers are reliable, so the description is
what is left to improve) and reasoning on medium items (they still carry a learning signal);
hard items go back to the warm-up.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time

from pebr.errors import ConfigError
from pebr.recipe.config import TrainConfig
from pebr.recipe.paths import sampling_dir
from pebr.rewards import accuracy_reward
from pebr.rollout.hf_engine import generate_rollouts

log = logging.getLogger("pebr")

SPLITS = ("easy", "medium", "hard")


@dataclasses.dataclass
class SamplingResult:
    k: int
    rollouts: list[dict]  # one per response: item_id, task_type, sample, response, correct, num_tokens
    n_correct: dict[str, int]  # item id -> correct responses out of k
    splits: dict[str, list[str]]  # "easy" | "medium" | "hard" -> item ids, in item order

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.splits.items()}


def split_of(correct: int, k: int) -> str:
    return "easy" if correct == k else "hard" if correct == 0 else "medium"


def sample_dataset(
    policy,
    items: list,
    *,
    k: int = 8,
    temperature: float = 1.2,
    top_p: float = 0.99,
    max_new_tokens: int = 256,
    batch_prompts: int = 16,
    progress: bool = False,
    world=None,
    engine=None,
) -> SamplingResult:
    """Roll every item out k times (groups of k per prompt), grade each response's final answer.

    world: a pebr.run.distributed.World: each rank rolls out items[rank::world_size] with its own
    (unsharded) copy of the policy and every rank returns the merged result, in item order.
    engine: the rollout engine (pebr.rollout.factory; default: transformers' generate)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    all_items = items
    if world is not None and world.world_size > 1:
        items = items[world.rank :: world.world_size]
    rollouts, n_correct = [], {}
    chunks = range(0, len(items), batch_prompts)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"sampling k={k}", unit="batch")
    for c0 in chunks:
        batch = items[c0 : c0 + batch_prompts]
        ro = generate_rollouts(policy, batch, n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               engine=engine)
        for row, text in enumerate(ro.texts):
            item = ro.item_of(row)
            ok = float(accuracy_reward(text, item.answer)) >= 1.0
            n_correct[item.id] = n_correct.get(item.id, 0) + int(ok)
            rollouts.append({
                "item_id": item.id, "task_type": item.task_type, "sample": row % k, "response": text,
                "correct": ok, "num_tokens": ro.num_tokens[row],
            })
    if world is not None and world.world_size > 1:
        parts = world.gather_objects((rollouts, n_correct))
        position = {it.id: i for i, it in enumerate(all_items)}
        rollouts = sorted((r for part, _ in parts for r in part), key=lambda r: (position[r["item_id"]], r["sample"]))
        n_correct = {k: v for _, part in parts for k, v in part.items()}
    items = all_items
    splits = {name: [] for name in SPLITS}
    for item in items:
        splits[split_of(n_correct.get(item.id, 0), k)].append(item.id)
    return SamplingResult(k=k, rollouts=rollouts, n_correct=n_correct, splits=splits)


SAMPLING_NOT_KEPT = "the sampling was not cached and nothing half-written was kept; run the command again to sample"


def write_sampling(result: SamplingResult, folder: str, *, meta: dict | None = None) -> None:
    """folder/rollouts.jsonl (one line per response) and folder/splits.json (k, counts, ids, meta),
    each written under a hidden name and renamed into place; an earlier splits.json goes first, so
    a write cut short (a signal, a full disk) leaves no sampling that looks finished."""
    os.makedirs(folder, exist_ok=True)
    splits, tmp = os.path.join(folder, "splits.json"), None
    try:
        if os.path.exists(splits):  # its presence marks a finished sampling: not beside other rollouts
            os.remove(splits)
        tmp = os.path.join(folder, ".rollouts.jsonl.tmp")
        with open(tmp, "w") as f:
            for r in result.rollouts:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, os.path.join(folder, "rollouts.jsonl"))
        doc = {"k": result.k, "counts": result.counts, "meta": meta or {}, "n_correct": result.n_correct,
               **result.splits}
        tmp = os.path.join(folder, ".splits.json.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, splits)  # written last: its presence marks a finished sampling
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise


def read_splits(folder: str) -> dict | None:
    """splits.json of a finished sampling in `folder`, or None: also for one that is unreadable or
    lacks its splits (edited by hand, an older version's), with a log line; it is sampled again."""
    path = os.path.join(folder, "splits.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        doc, why = None, f"unreadable ({type(exc).__name__})"
    else:
        why = "without its easy/medium/hard lists, k, counts or meta"
    if (isinstance(doc, dict) and all(isinstance(doc.get(s), list) for s in SPLITS) and isinstance(doc.get("k"), int)
            and isinstance(doc.get("meta"), dict) and isinstance(doc.get("counts"), dict)):
        return doc
    log.warning(f"{path}: {why}: not a finished sampling; it is not reused")
    return None


# ---- the cache the stages share, and the split a stage trains on

# settings a cached sampling must match to be reused by stage 1 (besides its model, items and k)
SAMPLING_SETTINGS = ("temperature", "top_p", "max_new_tokens")


def sampling_meta(*, model: str, data: str | None, k: int, num_items: int, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int) -> dict:
    """What splits.json records of a sampling: what a later stage compares before reusing it."""
    return {"model": os.path.abspath(model), "data": data, "k": k, "num_items": num_items,
            "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}


def sampling_plan(cfg: TrainConfig) -> str:
    """'N items x k=K (flags)' of the sampling a run will do."""
    s = cfg.sampling
    n = "the --data records" if cfg.data else f"{s.num_items} items"
    return f"{n} x k={s.k} (--sampling-items, --sampling-k)"


def _reuse_refusal(cfg: TrainConfig, cached: dict, meta: dict, ids: set) -> tuple[str | None, list[str]]:
    """(why the cached sampling cannot serve this stage, or None; the settings it differs in)."""
    cached_meta = cached.get("meta", {})
    cached_ids = set(cached["easy"]) | set(cached["medium"]) | set(cached["hard"])
    differ = [f"{k} {cached_meta.get(k)} (now {meta[k]})" for k in SAMPLING_SETTINGS if cached_meta.get(k) != meta[k]]
    # the same checkpoint reached through a symlink (a run folder linking another's stage0) is the same model
    same_model = isinstance(cached_meta.get("model"), str) and \
        os.path.realpath(cached_meta["model"]) == os.path.realpath(meta["model"])
    if cached_ids != ids:
        return "its items differ", differ
    if cached.get("k") != cfg.sampling.k:
        return f"it used k={cached.get('k')} (now {cfg.sampling.k})", differ
    # Stage 1 samples with its starting policy; stage 2 reuses that sampling (the paper samples once).
    if not same_model and cfg.stage != 2:
        return f"it sampled {cached_meta.get('model')}", differ
    if differ and cfg.stage != 2:
        return "it used " + ", ".join(differ), differ
    return None, differ


def ensure_sampling(cfg: TrainConfig, init_model: str, items: list, world=None) -> dict:
    """Dataset-level sampling of `items` with the policy at `init_model`, cached in OUT/sampling
    (each rank samples its share of the items; rank 0 writes the merged result) -> splits.json."""
    import torch

    from pebr.run.distributed import World
    from pebr.run.lock import hold
    from pebr.run.signals import stop_on_signals

    world = world or World(device=torch.device(cfg.device))
    with (stop_on_signals("dataset-level sampling", then=SAMPLING_NOT_KEPT),
          hold(sampling_dir(cfg.output_dir), world, log=log.warning)):  # the cache is shared by stages
        return _ensure_sampling(cfg, init_model, items, world)


def _ensure_sampling(cfg: TrainConfig, init_model: str, items: list, world) -> dict:
    from pebr.recipe.builder import load_stage_policy
    from pebr.rollout.factory import build_rollout_engine
    from pebr.run.distributed import seed_all

    folder = sampling_dir(cfg.output_dir)
    s = cfg.sampling
    meta = sampling_meta(model=init_model, data=cfg.data, k=s.k, num_items=len(items), temperature=s.temperature,
                         top_p=s.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    cached = read_splits(folder)
    if cached is not None:
        why, differ = _reuse_refusal(cfg, cached, meta, {it.id for it in items})
        if why is None:
            log.info(f"dataset-level sampling: cached in {folder}: {cached['counts']}")
            if differ:
                log.info(f"  note: the cached sampling used {', '.join(differ)}; stage 2 reuses stage 1's sampling "
                         f"(delete {folder} to sample again)")
            return cached
        log.info(f"dataset-level sampling cached in {folder} is not reused: {why}")
    log.info(f"dataset-level sampling: {sampling_plan(cfg)}, T={s.temperature}, top_p {s.top_p}, "
             f"max_new_tokens {cfg.max_new_tokens}, with {init_model}")
    # every rank rolls out its share with a whole (unsharded) copy of the policy
    policy = load_stage_policy(init_model, cfg, world=None, device=world.device)
    seed_all(cfg.seed, world.rank)  # reproducible splits: the run's seed, a distinct stream per rank
    t0 = time.perf_counter()
    res = sample_dataset(policy, items, k=s.k, temperature=s.temperature, top_p=s.top_p,
                         max_new_tokens=cfg.max_new_tokens, batch_prompts=s.batch_prompts,
                         progress=cfg.progress and world.is_main, world=world,
                         engine=build_rollout_engine(cfg.rollout_engine, policy))
    if world.is_main:
        write_sampling(res, folder, meta=meta)
    world.barrier()
    log.info(f"dataset-level sampling: {len(items)} items x k={s.k} in {time.perf_counter() - t0:.0f}s: "
             f"{res.counts} -> {folder}")
    return read_splits(folder)


# the splits a short one is topped up from, nearest first
_NEIGHBOURS = {"easy": ["medium", "hard"], "medium": ["easy", "hard"], "hard": ["medium", "easy"]}


def select_split(cfg: TrainConfig, items: list, splits: dict) -> list:
    """Items of the stage's split, topped up from the neighbouring split when smaller than
    min_split_items (`--split all`: every item). ConfigError when it stays empty."""
    name = cfg.train_split
    if name == "all":
        return items
    by_id = {it.id: it for it in items}
    chosen = [by_id[i] for i in splits[name] if i in by_id]
    if len(chosen) < cfg.min_split_items:
        for other in _NEIGHBOURS[name]:
            extra = [by_id[i] for i in splits[other] if i in by_id]
            need = cfg.min_split_items - len(chosen)
            if need <= 0:
                break
            log.info(f"split {name!r} holds {len(chosen)} items (< {cfg.min_split_items}): adding {min(need, len(extra))} {other!r} items")
            chosen += extra[:need]
    if not chosen:
        raise ConfigError(f"the {name!r} split is empty; pass --split all or --min-split-items N")
    return chosen
