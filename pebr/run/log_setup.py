"""Where the recipe's log lines go, set in one place and restored after.

    with stage_log("runs/stage1", world):     # rank 0: stderr and runs/stage1/train.log
        ...                                   # every "pebr" line of the stage
    # here the "pebr" logger is as it was before the block

Rank 0 writes INFO lines to stderr and to the folder's train.log; the other ranks only their
warnings and errors. A stage run inside another (stage 1 first runs the warm-up, stage 0) nests:
the inner block's lines go to its own train.log only, and the outer one's file takes the lines
again when the inner block ends. Nothing else in pebr touches the logger's handlers.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

LOGGER = "pebr"
log = logging.getLogger(LOGGER)
_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")


@contextlib.contextmanager
def stage_log(folder: str, world=None):
    """Within the block, the "pebr" logger writes as the module docstring says; after it, its level,
    handlers and propagation are what they were (the file closed)."""
    saved = (log.level, list(log.handlers), log.propagate)
    is_main = world is None or world.is_main
    added = []
    try:
        if is_main:
            os.makedirs(folder, exist_ok=True)
            log.setLevel(logging.INFO)
            added = [logging.StreamHandler(sys.stderr), logging.FileHandler(os.path.join(folder, "train.log"))]
        else:
            log.setLevel(logging.WARNING)
            added = [logging.StreamHandler(sys.stderr)]
        for h in saved[1]:
            log.removeHandler(h)
        for h in added:
            h.setFormatter(_FORMAT)
            log.addHandler(h)
        log.propagate = False
        yield log
    finally:
        for h in added:
            log.removeHandler(h)
            h.close()
        level, handlers, propagate = saved
        log.setLevel(level)
        for h in handlers:
            log.addHandler(h)
        log.propagate = propagate
