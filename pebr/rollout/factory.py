"""The one place a rollout engine is chosen: `TrainConfig.rollout_engine` (and `--rollout-engine` of
pebr.sample and pebr.eval) names one of ROLLOUT_ENGINES, and `build_rollout_engine` makes it.

    engine = build_rollout_engine("hf", policy, run=trainer.run, shared_prefix=True)
    gen = engine.generate(prompt, SamplingParams(n=8, temperature=1.0))
    engine.update_weights(policy.model)      # after each optimizer step (the trainer calls it)

Training, dataset-level sampling and eval all take the engine this returns, so an inference engine
(vLLM, SGLang) is added here once: a class with `generate` and `update_weights` (the
`pebr.rollout.types.RolloutEngine` protocol) and a name below. `update_weights` is the hook that
hands it the policy's new weights after each optimizer step; an engine in another process loads
them per parameter there and drops its prefix and encoder caches. The in-process transformers
engine reads the live model, so it has nothing to do.
"""
from __future__ import annotations

from typing import Callable

# name -> what it is (the names are TrainConfig.rollout_engine's choices and the flags')
ROLLOUT_ENGINES_HELP = {
    "hf": "transformers' generate with a KV cache, in this process, on the live policy",
}
ROLLOUT_ENGINES = tuple(ROLLOUT_ENGINES_HELP)


def build_rollout_engine(name: str, policy, *, run: Callable | None = None, shared_prefix: bool = True,
                         log: Callable[[str], None] | None = None):
    """The engine `name` on `policy`. run(fn, *args): how to call fn(model, *args) (the FSDP root's
    forward under data parallelism); shared_prefix: prefill each prompt once for its n responses;
    log: where the engine's one-time notes go. ConfigError for an unknown name."""
    if name == "hf":
        from pebr.rollout.hf_engine import HFRollout

        return HFRollout(policy, run=run, shared_prefix=shared_prefix, log=log)
    from pebr.errors import ConfigError

    raise ConfigError(f"rollout engine must be one of {', '.join(ROLLOUT_ENGINES)}, got {name!r}")
