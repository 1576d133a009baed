"""PeBR-R1 on the engine: the recipe layer, in packages by job (docs/pebr-map.md).

    pebr.train / sample / eval / plot / experiment / memory   entry points (`python -m ...`)
    pebr.recipe     config, stage building and running, dataset-level sampling, the ablation
    pebr.trainers   the training loop, SFT, GRPO
    pebr.rollout    rollout engines (transformers' generate), the factory that picks one
    pebr.model      the policy, tokenizer, image encoder, forward passes, transformers' internals
    pebr.rewards    perception and reasoning rewards
    pebr.data       built-in scenes and tasks, prompts, records from files, data order
    pebr.run        checkpoints, distributed, FSDP, locks, logging, metrics files, flags
    pebr.report     statistics, eval tables, plots
"""
from pebr import _legacy

_legacy.install()  # old module paths (pebr.stages, pebr.grpo_trainer, ...) keep working, with a warning
