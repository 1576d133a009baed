"""Old import paths of pebr's modules, kept for one release with a DeprecationWarning.

Until 2026-12 every module of the recipe lived in pebr/ itself (`pebr.stages`, `pebr.grpo_trainer`,
`pebr.checkpoint`, ...). They now live in packages by job (docs/pebr-map.md). A script that still
imports `pebr.grpo_trainer` gets the module that replaced it, the same module object (so
monkeypatching it patches the real one), and one DeprecationWarning naming the new path.

A module that was split in two or more is served by a small module in this package
(`pebr/_legacy/stages.py`, ...) that re-exports its old names from their new homes; monkeypatching
one of those patches only the alias, so tests and new code use the new paths.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module -> the module that replaced it
MOVED = {
    "pebr.policy": "pebr.model.policy",
    "pebr.tokenizer": "pebr._legacy.tokenizer",
    "pebr.images": "pebr.model.image_encoder",
    "pebr.row_limits": "pebr.model.context_limits",
    "pebr.logprobs": "pebr.model.forward",
    "pebr.shared_prefix": "pebr.model.shared_prefix",
    "pebr.kv_cache": "pebr.rollout.kv_cache",
    "pebr.trainer": "pebr._legacy.trainer",
    "pebr.sft": "pebr.trainers.sft",
    "pebr.grpo_trainer": "pebr._legacy.grpo_trainer",
    "pebr.scenes": "pebr.data.scenes",
    "pebr.tasks": "pebr.data.tasks",
    "pebr.prompts": "pebr.data.prompts",
    "pebr.checkpoint": "pebr._legacy.checkpoint",
    "pebr.distributed": "pebr.run.distributed",
    "pebr.fsdp": "pebr.run.fsdp",
    "pebr.run_lock": "pebr.run.lock",
    "pebr.machine": "pebr.run.machine",
    "pebr.metrics_log": "pebr.run.metrics_log",
    "pebr.cli": "pebr.run.cli",
    "pebr.config": "pebr.recipe.config",
    "pebr.sampling": "pebr.recipe.splits",
    "pebr.stages": "pebr._legacy.stages",
    "pebr.stats": "pebr.report.stats",
    "pebr.rewards.stages": "pebr.rewards.weighted",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names in MOVED and answers with the new module itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path works until the next release",
                      DeprecationWarning, stacklevel=3)
        module = importlib.import_module(new)
        self._spec = module.__spec__  # importlib sets module.__spec__ to the alias's: put the real one back
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec


def install() -> None:
    """Put the alias finder on sys.meta_path once (pebr/__init__.py calls it)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
