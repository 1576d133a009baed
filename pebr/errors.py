"""The errors pebr raises on purpose: one sentence each, for a caller to catch by type.

Library code raises these and never ends the process; each entry point's `main()` turns them into
one `error: ...` line and a non-zero exit status (`pebr.run.cli.errors_as_exit`), so a program that
imports pebr catches them like any other exception.

    PebrError                  every error below
      ConfigError(ValueError)  a setting that cannot work (a bad flag value, a missing split)
      DataError(ValueError)    no usable items: an unreadable file, every row broken, none fits
      MissingPolicyError       the policy a stage starts from does not exist yet
      RunLockError             another run holds the folder
      DivergedError            updates keep coming out non-finite, or the weights did
      Interrupted              SIGTERM / SIGINT: the run stopped at a step boundary with a checkpoint
      CheckpointError(ValueError)  a checkpoint that must not be loaded or could not be written
        DiskFullError(OSError)     ... for want of space (errno ENOSPC, as the OSError it also is)

The ValueError bases keep `except ValueError` in older callers working.
"""
from __future__ import annotations


class PebrError(Exception):
    """Base of pebr's own errors; str(error) is the one line the command prints after `error: `."""


class ConfigError(PebrError, ValueError):
    """A setting that cannot work; the message names the flag or field."""


class DataError(PebrError, ValueError):
    """No usable items: the message names the file or the reason."""


class MissingPolicyError(PebrError):
    """The stage's starting policy does not exist (the message says which stage to run first)."""


class CheckpointError(PebrError, ValueError):
    """A checkpoint that must not be loaded or could not be written; the message says why."""


class DiskFullError(OSError, CheckpointError):
    """A checkpoint could not be written for want of space: an OSError with errno ENOSPC (what a
    caller catching the OS's error expects) and a CheckpointError (what a command prints as one
    line). str(): the message alone, without the `[Errno 28]` prefix."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class RunLockError(PebrError):
    """Another run holds the folder. quiet: raised on a rank other than 0, whose rank 0 already said
    why (its command exits 1 without a second message)."""

    def __init__(self, message: str = "", *, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class DivergedError(PebrError):
    """Training diverged: several updates in a row had a non-finite gradient, or the weights hold
    non-finite values. Nothing was saved over the last good checkpoint."""


class Interrupted(PebrError):
    """The run got SIGTERM or SIGINT, finished its step, saved a checkpoint and stopped. signum:
    the signal; a command exits with 128 + signum, the shell's convention (143, 130)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
