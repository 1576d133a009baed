"""SIGTERM and SIGINT outside the training loop: loading the policy and data, dataset-level sampling.

    with stop_on_signals("dataset-level sampling", then="the sampling was not cached: run the command again"):
        ...                      # a signal raises Interrupted here, at once

Inside the loop the trainer defers a signal to the end of the step and saves a checkpoint
(pebr.trainers.base.StopSignals, which takes the handlers over for the loop and gives them back).
Anywhere else a stage holds nothing worth saving yet, so the first signal raises
pebr.errors.Interrupted where the program is: `finally` blocks release the run's lock and remove
what was half-written (files are written under hidden temporary names and renamed into place), and
the command prints one line and exits 128 + the signal (143 for SIGTERM, 130 for SIGINT). A second
signal during that clean-up exits at once. Blocks nest: the innermost one's words are used.
Handlers can only be set from the main thread; elsewhere the block runs without them.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from pebr.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state = {"raised": False, "depth": 0}  # raised: a signal already raised, the next one exits at once


class _Signalled(BaseException):
    """What the handler raises: a BaseException, as KeyboardInterrupt is, so that no `except
    Exception` on its way (a reader skipping bad rows, a grader's time limit) takes it for an error
    and goes on; the outermost block turns it into Interrupted."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(what: str, *, then: str = "nothing of it was kept; run the command again"):
    """For the block, SIGTERM/SIGINT raise Interrupted("stopped by SIGTERM during {what}; {then}")."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if _state["raised"]:
            print(f"{name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        _state["raised"] = True
        raise _Signalled(signum, f"stopped by {name} during {what}; {then}")

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    _state["depth"] += 1
    try:
        yield
    except _Signalled as exc:
        if _state["depth"] > 1:  # an outer block turns it into Interrupted
            raise
        raise Interrupted(exc.signum, str(exc)) from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state["depth"] -= 1
        if _state["depth"] == 0:  # the outermost block is done: a later signal is a first one again
            _state["raised"] = False
