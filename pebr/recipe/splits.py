"""Dataset-level sampling: k rollouts per item, scored by accuracy, split by difficulty.

    result = sample_dataset(policy, items, k=8, temperature=1.2, top_p=0.99, max_new_tokens=256)
    result.splits["easy"]      # ids of items with k/k correct; "medium": 1..k-1; "hard": 0
    write_sampling(result, folder)   # rollouts.jsonl + splits.json (counts and ids)

The paper trains perception on easy items (their answers are reliable, so the description is
what is left to improve) and reasoning on medium items (they still carry a learning signal);
hard items go back to the warm-up.
"""
from __future__ import annotations

import dataclasses
import json
import os

from pebr.rollout.hf_engine import generate_rollouts

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
) -> SamplingResult:
    """Roll every item out k times (groups of k per prompt), grade each response's final answer.

    world: a pebr.run.distributed.World: each rank rolls out items[rank::world_size] with its own
    (unsharded) copy of the policy and every rank returns the merged result, in item order."""
    from pebr.rewards import accuracy_reward

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
        ro = generate_rollouts(policy, batch, n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
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


def write_sampling(result: SamplingResult, folder: str, *, meta: dict | None = None) -> None:
    """folder/rollouts.jsonl (one line per response) and folder/splits.json (k, counts, ids, meta)."""
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".rollouts.jsonl.tmp")
    with open(tmp, "w") as f:
        for r in result.rollouts:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, os.path.join(folder, "rollouts.jsonl"))
    doc = {"k": result.k, "counts": result.counts, "meta": meta or {}, "n_correct": result.n_correct, **result.splits}
    tmp = os.path.join(folder, ".splits.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, os.path.join(folder, "splits.json"))  # written last: its presence marks a finished sampling


def read_splits(folder: str) -> dict | None:
    """splits.json of a finished sampling in `folder`, or None."""
    path = os.path.join(folder, "splits.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
