"""What `--model PATH` names -> the Hugging Face model folder to load.

    path = resolve_model_path("runs/stage0")        # its latest checkpoint, now
    with hold_model_path("runs/stage0") as path:    # the same, kept from pruning while it loads
        policy = load_policy(path)
"""
from __future__ import annotations

import json
import logging
import os
import re

from pebr.errors import CheckpointError
from pebr.run.checkpoint import (
    _STEP_DIR,
    ADAPTER_CONFIG,
    LATEST,
    find_latest,
    mark_reading,
)

log = logging.getLogger("pebr")

_STAGE_DIR = re.compile(r"stage([0-9]+)")


def _last_stage_checkpoint(run_dir: str) -> tuple[str, str | None] | None:
    """A run folder (OUT, holding stage0/, stage1/, ...) -> (its last stage folder that has
    checkpoints/, that stage's latest complete checkpoint or None); None when it holds no stage."""
    stages = sorted((int(m.group(1)), name) for name in os.listdir(run_dir)
                    if (m := _STAGE_DIR.fullmatch(name)) and os.path.isdir(os.path.join(run_dir, name, "checkpoints")))
    for _, name in reversed(stages):
        found = find_latest(os.path.join(run_dir, name, "checkpoints"))
        if found:
            return os.path.join(run_dir, name), found
    return (os.path.join(run_dir, stages[-1][1]), None) if stages else None


def resolve_model_path(path: str | os.PathLike) -> str:
    """What `--model PATH` names -> an HF model folder. PATH may be an HF folder, a stage folder
    (OUT/stageK: its latest checkpoint), a checkpoints folder (its latest checkpoint), the
    `latest` pointer file in one, or a run folder (OUT: the latest checkpoint of its last stage
    that has one, stage 2 before 1 before 0). CheckpointError (a ValueError) saying what was found otherwise."""
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) == LATEST:
        root = os.path.dirname(os.path.abspath(path))
        found = find_latest(root)
        if found is None:
            raise CheckpointError(f"--model {path}: names no complete checkpoint in {root}")
        return found
    if not os.path.isdir(path):
        raise CheckpointError(f"--model {path}: no such folder")
    if _is_hf_folder(path):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root) and (os.path.isfile(os.path.join(root, LATEST)) or
                                    any(_STEP_DIR.fullmatch(n) for n in os.listdir(root))):
            found = find_latest(root)
            if found is None:
                raise CheckpointError(f"--model {path}: {root} holds no complete checkpoint (a run killed before its first save?)")
            return found
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise CheckpointError(f"--model {path}: {os.path.join(path, 'checkpoints')} holds no checkpoint yet")
    run = _last_stage_checkpoint(path)
    if run is not None:
        stage, found = run
        if found is None:
            raise CheckpointError(f"--model {path}: no stage of this run folder holds a complete checkpoint yet "
                                  f"(latest stage folder: {stage})")
        return found
    raise CheckpointError(f"--model {path}: not a model folder (no config.json with model weights), a stage folder "
                          f"(OUT/stageK with checkpoints/), a checkpoints folder or a run folder (OUT with stageK/)")


def _is_hf_folder(path: str) -> bool:
    """config.json of a model (not a stage's TrainConfig) beside its weights, or a LoRA checkpoint's
    adapter (its base model named inside; pebr.model.policy.load_policy merges the two)."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))
    try:
        with open(cfg) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "model_type" in doc


class HeldModel:
    """A resolved `--model` (`.path`) marked as being read (pebr.run.checkpoint.mark_reading) until
    `release()` or the end of a `with` block; a context manager, released at most once."""

    def __init__(self, path: str, mark):
        self.path, self._mark = path, mark

    def release(self) -> None:
        mark, self._mark = self._mark, None
        if mark is not None:
            mark.release()

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        self.release()


def hold_model_path(path: str | os.PathLike, *, tries: int = 5) -> HeldModel:
    """resolve_model_path(path), kept from pruning until released: what a reader of a run that is
    still training (pebr.eval --model OUT/stage0) loads from. A checkpoint pruned between being
    resolved and being marked means a newer one was saved: PATH is resolved again (at most `tries`
    times; a PATH naming that very checkpoint then says it no longer exists)."""
    for attempt in range(tries):
        found = resolve_model_path(path)
        try:
            return HeldModel(found, mark_reading(found))
        except FileNotFoundError:
            log.info(f"--model {path}: {found} was removed (pruned by its run) before it could be marked; "
                     f"resolving again")
    raise CheckpointError(f"--model {path}: its latest checkpoint was removed {tries} times before it could be "
                          f"loaded (a run saving faster than it loads?); try again")
