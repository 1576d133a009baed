"""Rollouts: P prompts (each with its images) -> P groups of n sampled responses, and their log-probs.

    from pebr.rollout import build_rollout_engine, generate_rollouts
    engine = build_rollout_engine(cfg.rollout_engine, policy)
    ro = generate_rollouts(policy, items, n=8, temperature=1.0, max_new_tokens=96, engine=engine)

types.py      Rollouts, SamplingParams, Generation, the RolloutEngine protocol
factory.py    the engine named by the config (one place to add vLLM or SGLang)
hf_engine.py  transformers' generate with a KV cache; generate_rollouts
kv_cache.py   decode's key/value buffers sized once per rollout
"""
from pebr.rollout.factory import ROLLOUT_ENGINES, build_rollout_engine
from pebr.rollout.hf_engine import HFRollout, generate_rollouts
from pebr.rollout.types import (
    Generation,
    RolloutEngine,
    Rollouts,
    SamplingParams,
    response_mask_from,
)

__all__ = ["ROLLOUT_ENGINES", "Generation", "HFRollout", "RolloutEngine", "Rollouts", "SamplingParams",
           "build_rollout_engine", "generate_rollouts", "response_mask_from"]


def __getattr__(name: str):
    # `pebr.rollout.item_images` (before 2026-12): every item carries its images as `item.images`.
    if name == "item_images":
        import warnings

        warnings.warn("pebr.rollout.item_images is gone: use item.images (pebr.data.tasks.TaskItem)",
                      DeprecationWarning, stacklevel=2)
        return lambda item: list(item.images)
    raise AttributeError(f"module 'pebr.rollout' has no attribute {name!r}")
