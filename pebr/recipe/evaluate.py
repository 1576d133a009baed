"""Held-out accuracy of a policy with the training grader (greedy by default): the records and
summary `pebr.eval` and `pebr.experiment` write."""
from __future__ import annotations

from pebr.report.eval_tables import summarize
from pebr.rewards import accuracy_reward, format_reward
from pebr.rollout.hf_engine import generate_rollouts


def evaluate(policy, items: list, *, max_new_tokens: int = 96, temperature: float = 0.0, batch_prompts: int = 32,
             world=None, confidence: float = 0.95, engine=None) -> tuple[dict, list[dict]]:
    """-> (summary, one record per item); the summary as `summarize(records)` gives it.

    temperature: 0 (the default) decodes greedily, so the result does not depend on the RNG.
    world: a pebr.run.distributed.World: each rank answers items[rank::world_size]; every rank gets the
    merged records in item order. engine: the rollout engine (pebr.rollout.factory; default:
    transformers' generate)."""

    records = []
    W = world.world_size if world is not None else 1
    mine = items[world.rank :: W] if W > 1 else items
    for c0 in range(0, len(mine), batch_prompts):
        batch = mine[c0 : c0 + batch_prompts]
        ro = generate_rollouts(policy, batch, n=1, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens,
                               engine=engine)
        for item, text, k in zip(batch, ro.texts, ro.num_tokens):
            records.append({
                "id": item.id, "task_type": item.task_type, "kind": item.kind, "problem": item.problem,
                "answer": item.answer,
                "response": text, "num_tokens": k, "correct": accuracy_reward(text, item.answer) >= 1.0,
                "format": format_reward(text),
            })
    if W > 1:
        position = {it.id: i for i, it in enumerate(items)}
        records = sorted((r for part in world.gather_objects(records) for r in part), key=lambda r: position[r["id"]])
    summary = summarize(records, confidence=confidence)
    return summary, records
