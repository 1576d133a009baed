"""Atomic checkpoints: an HF folder (safetensors + tokenizer + preprocessor) plus trainer state.

    ckpt = Checkpointer(root)                          # root = output_dir/stage{k}/checkpoints
    ckpt.save(step, policy, state, world=world, optimizer=opt, rng=rng_state())
                                                       # -> root/step_0000040, then `latest` -> it
    path = ckpt.latest()                               # newest complete checkpoint or None
    path = resolve_model_path("runs/stage2")           # --model: HF, stage or checkpoints folder, or `latest`
    state = load_trainer_state(path)                   # step, data position, schedule, config
    ckpt.load_optimizer(path, model, opt, state)       # at any world size
    rng = ckpt.load_rng(path, rank)                    # this rank's RNG streams, or None
    set_rng_state(rng)                                 # rng_state()'s tensors and numbers back in the RNGs

What a checkpoint holds: the model as a `save_pretrained` folder written by rank 0 from the full
state dict (gathered from the FSDP shards to the CPU), so transformers loads it as is;
`trainer_state.json` (step, data position, scheduler, config; rank 0); the optimizer under
`optimizer/` through `torch.distributed.checkpoint` (one file per rank, resharded on load, so a
run may resume with another world size); `rng_rank{r}.pt`, each rank's RNG streams.
Multi-node runs need the output folder on a file system every node sees.

Crash safety (SIGKILL at any moment): a checkpoint is written into a hidden temp folder in the
same parent (named by rank 0, every rank writing its part), every file fsynced, then, after a
barrier, renamed into place by rank 0 in one `os.rename`; the `latest`
pointer is a small file replaced with `os.replace`. Old checkpoints are renamed to a hidden
trash name before being deleted. So every visible `step_*` folder is complete, and `latest`
names one of them; leftovers of a killed write are hidden and swept on the next start.

Readers of a run that is still training (`pebr.eval --model OUT/stage0`) mark the checkpoint they
load (`mark_reading`: a share-locked `.reader-*` file inside it, placed under an flock of the
checkpoints folder, which pruning holds between checking a checkpoint and renaming it away);
pruning passes over a marked checkpoint, with a log line, until a later save finds it unread. A
killed reader's mark holds no lock and counts for nothing.
The model folder is an ordinary `save_pretrained` folder: transformers loads it as is.

A failed write (a full disk, an error on any rank) removes its temp folder and raises on every
rank: DiskFullError (an OSError ENOSPC) "no space left on device ..." when the disk is full,
whatever words the writer used (torch.save says `basic_ios::clear: iostream error`); `latest` still
names the previous checkpoint. Before a save, when the disk has less free space than the last
checkpoint took, the older checkpoints --keep-checkpoints would keep are pruned down to the one
`latest` names, with a log line.

Each checkpoint records every file's size and a CRC-32 of its first and last 64 KiB
(`manifest.json`, written last); a checkpoint whose files do not match (a file cut short by a full
disk or a copy, or changed) is not complete: `latest`, `--resume` and `--model` fall back to the
newest checkpoint that verifies and log which one was skipped and why.

Loading trusts no file: `rng_rank{r}.pt` and a legacy `trainer_state.pt` are read with
`torch.load(weights_only=True)` (RNG states are stored as tensors and plain numbers; older files'
NumPy key arrays are allowed, nothing else), the optimizer's `.metadata` pickle is checked against
torch.distributed.checkpoint's own record types before dcp reads it, and `latest` is followed
only to a `step_NNNNNNN` folder inside its own folder. Anything else: CheckpointError saying so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zlib

import numpy as np
import torch

from pebr.errors import CheckpointError, DiskFullError  # noqa: F401  (CheckpointError importable from here as before)
from pebr.run.lock import ReaderMark, describe, folder_lock, live_readers

try:  # torch.distributed.checkpoint's error derives from BaseException: `except Exception` misses it
    from torch.distributed.checkpoint.api import CheckpointException as _DcpError
except ImportError:  # a torch built without distributed
    class _DcpError(Exception):
        pass

STATE_FILE = "trainer_state.json"
LEGACY_STATE_FILE = "trainer_state.pt"  # checkpoints written before torch.distributed.checkpoint
OPTIMIZER_DIR = "optimizer"
LATEST = "latest"
_STEP_DIR = re.compile(r"step_([0-9]+)")  # fullmatch: a plain name, nothing before or after
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

log = logging.getLogger("pebr")




def _free_bytes(folder: str) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _tree_size(folder: str) -> int:
    """Bytes of the files under `folder` (0 when it is gone)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _size(n: int | None) -> str:
    return "unknown space" if n is None else f"{n / 2**20:.1f} MiB"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _is_disk_full(exc: BaseException, free: int | None) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT anywhere in its chain, the OS's words
    in its text (safetensors and torch.save wrap the OSError), or almost nothing left on the disk
    (torch.save's `basic_ios::clear: iostream error` says nothing at all)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        text = str(exc).lower()
        if "no space left" in text or "os error 28" in text or "quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return free is not None and free < 64 * 2**20


def _fsync_tree(folder: str) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chmod_add(path: str, bits: int) -> None:
    try:
        os.chmod(path, os.stat(path).st_mode & 0o7777 | bits)
    except OSError:  # another node's user wrote it: leave it as it is
        pass


def _make_readable(folder: str) -> None:
    """Let other users and containers read a checkpoint: folders gain 0755, files 0644 (mkdtemp
    and mkstemp create 0700 / 0600, and a tight umask does the same to save_pretrained's files)."""
    for dirpath, dirs, files in os.walk(folder):
        _chmod_add(dirpath, 0o755)
        for name in files:
            _chmod_add(os.path.join(dirpath, name), 0o644)


MANIFEST_FILE = "manifest.json"  # every file's size and a sampled CRC-32, written last (checkpoints since 2026-12)
_CRC_SPAN = 1 << 16  # bytes hashed at each end of a file: catches truncation and torn ends cheaply


def _sampled_crc(path: str, size: int) -> int:
    """CRC-32 of a file's first and last 64 KiB (all of it when smaller): a cheap check, not a hash."""
    with open(path, "rb") as f:
        head = f.read(_CRC_SPAN)
        tail = b""
        if size > 2 * _CRC_SPAN:
            f.seek(size - _CRC_SPAN)
            tail = f.read(_CRC_SPAN)
        elif size > _CRC_SPAN:
            tail = f.read()
    return zlib.crc32(tail, zlib.crc32(head))


def write_manifest(folder: str) -> None:
    """folder/manifest.json: {relative path: {"size", "crc32"}} of every file under `folder`."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, folder)
            if rel != MANIFEST_FILE:
                size = os.path.getsize(full)
                files[rel] = {"size": size, "crc32": _sampled_crc(full, size)}
    with open(os.path.join(folder, MANIFEST_FILE), "w") as f:
        json.dump({"files": files}, f, indent=0, sort_keys=True)


def verify(path: str) -> str | None:
    """None when checkpoint `path` holds what its manifest recorded (or has no manifest: an older
    checkpoint), else why not, in a few words (a file missing, cut short, or changed)."""
    manifest = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest):
        return None
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
        for rel, want in sorted(files.items()):
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                return f"{rel} is missing"
            size = os.path.getsize(full)
            if size != want["size"]:
                return f"{rel} is {size} bytes, {want['size']} when saved"
            if _sampled_crc(full, size) != want["crc32"]:
                return f"{rel} changed since it was saved (checksum)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its {MANIFEST_FILE} is unreadable ({type(exc).__name__})"
    return None


ADAPTER_CONFIG = os.path.join("adapter", "adapter_config.json")  # a LoRA checkpoint's adapter (pebr.model.lora)


def has_model(path: str) -> bool:
    """Whether folder `path` holds a policy: a model's config.json, or a LoRA adapter (mid-stage
    LoRA checkpoints hold the adapter alone; pebr.model.policy.load_policy merges it into its base)."""
    return os.path.isfile(os.path.join(path, "config.json")) or os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def _is_complete(path: str) -> bool:
    has_state = any(os.path.isfile(os.path.join(path, f)) for f in (STATE_FILE, LEGACY_STATE_FILE))
    return has_state and has_model(path) and verify(path) is None


def _inside(root: str, path: str) -> bool:
    """Whether `path`, links followed, is an entry of the folder `root`."""
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(root)


def _complete_steps(root: str) -> list[int]:
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.fullmatch(name)
        path = os.path.join(root, name)
        if m and _is_complete(path):
            if not _inside(root, path):
                log.warning(f"checkpoints: ignoring {path}: a link to {os.path.realpath(path)}, outside {root}")
                continue
            out.append(int(m.group(1)))
    return sorted(out)


def find_latest(root: str | os.PathLike) -> str | None:
    """The checkpoint under `root` that its `latest` pointer names, or the newest complete one if
    the pointer is missing or stale (names a step folder that is gone or incomplete); None when
    there is none (or no `root`). Creates nothing.

    The pointer is followed only to a folder of `root` itself: a plain `step_NNNNNNN` name, not a
    link leading elsewhere. Anything else (`../..`, an absolute path, an escaping link) is no
    pointer this code wrote: CheckpointError rather than a silent fall-back, so a tampered or
    hand-edited pointer is seen, not resumed around."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return None
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8", errors="replace") as f:
            name = f.read(4096).strip()
        cand = os.path.join(root, name)
        if name and not _STEP_DIR.fullmatch(name):
            raise CheckpointError(f"{pointer} names {name[:200]!r}, not a step_NNNNNNN folder beside it: refusing to "
                                  f"follow it outside {root}; fix or delete the file (then the newest complete "
                                  f"checkpoint is used)")
        if name and os.path.lexists(cand) and not _inside(root, cand):
            raise CheckpointError(f"{pointer} names {name}, a link to {os.path.realpath(cand)} outside {root}: "
                                  f"refusing to follow it; replace the link by the checkpoint folder itself")
        if name and _is_complete(cand):
            return cand
        if name and os.path.isdir(cand) and (why := verify(cand)) is not None:
            log.warning(f"checkpoints: {pointer} names {name}, which does not verify ({why}); "
                        f"using the newest checkpoint that does")
    steps = _complete_steps(root)
    for name in sorted(os.listdir(root), reverse=True):  # newer step folders passed over: say why
        m = _STEP_DIR.fullmatch(name)
        if m and (not steps or int(m.group(1)) > steps[-1]) and (why := verify(os.path.join(root, name))) is not None:
            log.warning(f"checkpoints: skipping {os.path.join(root, name)}: {why}")
    return os.path.join(root, f"step_{steps[-1]:07d}") if steps else None


def mark_reading(path: str | os.PathLike) -> ReaderMark | None:
    """Mark checkpoint `path` as being loaded until `mark.release()`: its trainer's pruning
    (--keep-checkpoints) leaves it in place meanwhile -> the mark. None when `path` is not a
    `step_NNNNNNN` checkpoint (an HF folder: nothing prunes it) or cannot be marked (a folder this
    user may not write: logged, and the load goes on unprotected). FileNotFoundError when `path`
    is gone: pruned after it was resolved, so a newer checkpoint exists; resolve again
    (pebr.run.model_path.hold_model_path does)."""
    path = os.path.normpath(os.fspath(path))
    if not _STEP_DIR.fullmatch(os.path.basename(path)):
        return None
    with folder_lock(os.path.dirname(os.path.abspath(path))):  # the checkpoints folder: pruning waits
        if not os.path.isdir(path):  # under the lock: no pruning between this check and the mark
            raise FileNotFoundError(errno.ENOENT, "the checkpoint was removed before it could be marked", path)
        try:
            return ReaderMark(path).place()
        except FileNotFoundError:
            raise
        except OSError as exc:
            log.warning(f"{path}: cannot mark it as being read ({_one_line(exc)}); loading it unprotected: "
                        f"a trainer pruning its checkpoints may remove it meanwhile")
            return None


class Checkpointer:
    """Writes and finds checkpoints under `root` (created if missing)."""

    def __init__(self, root: str | os.PathLike, *, keep: int = 2):
        self.root = os.fspath(root)
        self.keep = max(1, int(keep))
        os.makedirs(self.root, exist_ok=True)

    def sweep(self) -> None:
        """Remove hidden leftovers (temp folders of killed writes, trash)."""
        for name in os.listdir(self.root):
            if name.startswith(".tmp-") or name.startswith(".trash-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return _complete_steps(self.root)

    def unverified(self) -> list[tuple[str, str]]:
        """[(path, why)] of the step folders with state that fail verification, newest first."""
        out = []
        for name in sorted(os.listdir(self.root), reverse=True):
            path = os.path.join(self.root, name)
            if _STEP_DIR.fullmatch(name) and os.path.isfile(os.path.join(path, STATE_FILE)):
                why = verify(path)
                if why is not None:
                    out.append((path, why))
        return out

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:07d}")

    def latest(self) -> str | None:
        """The checkpoint `latest` names, or the newest complete one if the pointer is missing/stale."""
        return find_latest(self.root)

    def save(self, step: int, policy, state: dict, *, world=None, optimizer=None, rng: dict | None = None,
             merged: bool = True) -> str:
        """Write checkpoint `step` atomically, point `latest` at it, prune old ones -> its path.

        policy: its model's full state dict goes to the HF folder; state: JSON-able trainer state;
        optimizer: saved through torch.distributed.checkpoint; rng: this rank's RNG state. Under
        data parallelism every rank calls this (collectives inside). merged: with LoRA, the merged
        model beside the adapter (else the adapter alone: only the trainable tensors are gathered).
        """
        from pebr.run.distributed import World
        from pebr.run.fsdp import full_state_dict

        world = world or World()
        final = self.path(step)
        tmp, error = None, None
        if world.is_main:
            try:
                self._make_room()
            except OSError as exc:  # the save itself says whether room was missing
                log.warning(f"checkpoints: could not make room in {self.root} before saving: {_one_line(exc)}")
            try:
                tmp = tempfile.mkdtemp(prefix=f".tmp-step_{step:07d}-", dir=self.root)
            except OSError as exc:
                error = exc
        tmp = world.broadcast_object(tmp)
        # Sharded: gather the full weights to rank 0. A world of one lets save_pretrained read the model
        # itself, as before scale-out (it knows the model's tied weights; a plain dict would not say).
        adapter_only = getattr(policy, "adapter", None) is not None and not merged
        model_state = (full_state_dict(policy.model, distributed=True, trainable_only=adapter_only)
                       if world.distributed else None)
        try:
            if tmp is not None:
                self._write_parts(tmp, policy, state, world, optimizer, rng, model_state, merged)
        except (Exception, _DcpError) as exc:  # a full disk shows as OSError, RuntimeError, SafetensorError, dcp's
            error = exc                         # CheckpointException (a BaseException): all fail alike
        # every rank's files are in tmp, or some rank failed: then all fail together, none waits
        if world.max([0.0 if error is None else 1.0])[0] > 0:
            self._failed_save(step, tmp, error, world)
        if world.is_main:
            try:
                write_manifest(tmp)  # every rank's files are in: their sizes and checksums, checked at load
                _make_readable(tmp)
                _chmod_add(self.root, 0o755)
                _fsync_tree(tmp)  # a full disk may show only here (delayed allocation)
            except OSError as exc:
                error = exc
        if world.max([0.0 if error is None else 1.0])[0] > 0:
            self._failed_save(step, tmp, error, world)
        if world.is_main:
            if os.path.exists(final):  # a re-run of the same step: move the old one out of the way first
                self._trash(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._point_latest(os.path.basename(final))
            self._prune(keep_name=os.path.basename(final))
        world.barrier()  # nobody returns before the checkpoint is visible
        return final

    def _make_room(self) -> None:
        """Before a save: when the disk has less free space than the last checkpoint took, the
        checkpoints --keep-checkpoints would still keep are pruned down to the one `latest` names
        first, with a log line (a save then fails only when one checkpoint's room is missing)."""
        try:
            latest = find_latest(self.root)
        except CheckpointError:  # a pointer it will not follow: leave the folder as it is
            return
        if latest is None or len(self.steps()) < 2:
            return
        need, free = _tree_size(latest), _free_bytes(self.root)
        if free is None or free >= need:
            return
        freed = self._prune(keep_name=os.path.basename(latest), keep=1)
        log.warning(f"checkpoints: {_size(free)} free in {self.root}, less than the last checkpoint's {_size(need)}: "
                    f"pruned below --keep-checkpoints {self.keep} to {os.path.basename(latest)} before saving "
                    f"({_size(freed)} freed)")

    def _write_parts(self, tmp: str, policy, state: dict, world, optimizer, rng: dict | None, model_state,
                     merged: bool = True) -> None:
        """This rank's files of a checkpoint into `tmp`: optimizer shard, RNG streams; rank 0 also the
        HF folder and trainer_state.json."""
        if optimizer is not None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            osd = get_optimizer_state_dict(policy.model, optimizer)
            with warnings.catch_warnings():  # "assuming ... a single process": yes, in a world of one
                warnings.filterwarnings("ignore", message=".*single process.*")
                dcp.save({"optimizer": osd}, checkpoint_id=os.path.join(tmp, OPTIMIZER_DIR),
                         no_dist=not world.distributed)
        if rng is not None:
            torch.save(rng, os.path.join(tmp, f"rng_rank{world.rank}.pt"))
        if world.is_main:
            policy.save(tmp, state_dict=model_state, merged=merged)  # merged: LoRA's alone (Policy.save)
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f, indent=1)

    def _failed_save(self, step: int, tmp: str | None, error: BaseException | None, world) -> None:
        """A save that failed on some rank: remove its temp folder (rank 0), raise on every rank.
        A full disk reads "no space left on device" whatever the writer said (torch.save says
        `basic_ios::clear: iostream error`)."""
        free = _free_bytes(self.root)  # before the temp folder goes: afterwards the disk looks fine
        if world.is_main and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            prev = find_latest(self.root)
        except CheckpointError:
            prev = None
        kept = f"`latest` still names {os.path.basename(prev)}" if prev else "no earlier checkpoint"
        if error is None:
            raise CheckpointError(f"checkpoint step {step}: another rank failed to write its part (its error says "
                                  f"why); the partial checkpoint was removed, {kept}")
        if _is_disk_full(error, free):
            need = f"; needs about {_size(_tree_size(prev))}, the last checkpoint's size" if prev else ""
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing checkpoint step {step} to "
                                              f"{self.root} ({_size(free)} free{need}; the writer said: "
                                              f"{_one_line(error)}); the partial checkpoint was removed, {kept}; free "
                                              f"some space (or lower --keep-checkpoints) and --resume") from error
        raise CheckpointError(f"checkpoint step {step} could not be written to {self.root}: {type(error).__name__}: "
                              f"{_one_line(error)}; the partial checkpoint was removed, {kept}") from error

    def load_optimizer(self, path: str, model, optimizer, state: dict | None = None) -> None:
        """Restore the optimizer saved with checkpoint `path`, at this run's world size."""
        opt_dir = os.path.join(path, OPTIMIZER_DIR)
        if os.path.isdir(opt_dir):
            import torch.distributed as dist
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                get_optimizer_state_dict,
                set_optimizer_state_dict,
            )

            _check_dcp_metadata(opt_dir)  # dcp unpickles its .metadata without restriction
            osd = get_optimizer_state_dict(model, optimizer)  # the layout to read into (state initialized)
            box = {"optimizer": osd}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*single process.*")
                dcp.load(box, checkpoint_id=opt_dir, no_dist=not dist.is_initialized())
            set_optimizer_state_dict(model, optimizer, box["optimizer"])
        elif state is not None and "optimizer" in state:  # a legacy checkpoint: a plain state dict
            optimizer.load_state_dict(state["optimizer"])

    def load_rng(self, path: str, rank: int) -> dict | None:
        """Rank `rank`'s RNG state saved with `path` (None when that rank did not exist then).
        Tensors and plain data only: CheckpointError for a file holding anything else."""
        f = os.path.join(path, f"rng_rank{rank}.pt")
        if os.path.isfile(f):
            return _safe_load(f)
        state = None
        legacy = os.path.join(path, LEGACY_STATE_FILE)
        if rank == 0 and os.path.isfile(legacy):
            state = _safe_load(legacy).get("rng")
        return state

    def _point_latest(self, name: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-latest-", dir=self.root)
        try:
            os.chmod(tmp, 0o644)  # mkstemp makes 0600
            with os.fdopen(fd, "w") as f:
                f.write(name + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.root, LATEST))
        except BaseException:  # disk full: the old pointer stays, naming a complete checkpoint
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        _fsync_dir(self.root)

    def _trash(self, path: str) -> None:
        shutil.rmtree(self._hide(path), ignore_errors=True)

    def _hide(self, path: str) -> str:
        """Rename checkpoint `path` to a hidden trash folder (atomic: gone from view at once) -> that folder."""
        trash = tempfile.mkdtemp(prefix=".trash-", dir=self.root)
        os.rename(path, os.path.join(trash, os.path.basename(path)))
        return trash

    def _prune(self, *, keep_name: str, keep: int | None = None) -> int:
        """Remove the oldest checkpoints beyond `keep` (default --keep-checkpoints), never
        `keep_name`, nor one a reader is loading (pebr.eval on a training run: `mark_reading`),
        which stays, with a log line, until a later save finds it unread -> bytes freed."""
        keep = self.keep if keep is None else keep
        hidden, freed = [], 0
        with folder_lock(self.root):  # no reader marks a checkpoint between its check and its rename
            steps = self.steps()
            for s in steps[: max(0, len(steps) - keep)]:
                path = self.path(s)
                if os.path.basename(path) == keep_name:
                    continue
                readers = live_readers(path)
                if readers:
                    log.info(f"checkpoints: keeping {os.path.basename(path)} past --keep-checkpoints {self.keep} "
                             f"while {len(readers)} reader(s) load it ({describe(readers[0])}); a later save "
                             f"removes it")
                    continue
                freed += _tree_size(path)
                hidden.append(self._hide(path))
        for trash in hidden:  # the deleting itself outside the lock: readers wait only for renames
            shutil.rmtree(trash, ignore_errors=True)
        return freed

    def clear(self) -> None:
        """Remove every checkpoint (a fresh run in a used folder)."""
        pointer = os.path.join(self.root, LATEST)
        if os.path.exists(pointer):
            os.remove(pointer)
        for s in self.steps():
            self._trash(self.path(s))
        self.sweep()


def load_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer state saved with a checkpoint: step, data_position, scheduler, config, init_model."""
    f = os.path.join(path, STATE_FILE)
    if os.path.isfile(f):
        with open(f) as fh:
            return json.load(fh)
    # checkpoints written before trainer_state.json: tensors and plain data only, like any file we read
    return _safe_load(os.path.join(path, LEGACY_STATE_FILE))


def _numpy_globals() -> list:
    """What older pebr RNG files need besides tensors: NumPy's MT19937 key array (an ndarray
    rebuilt by numpy's own constructor, which runs nothing else)."""
    core = getattr(np, "_core", None) or np.core
    out = [np.ndarray, np.dtype, (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
           (core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None and hasattr(dtypes, "UInt32DType"):
        out.append(dtypes.UInt32DType)
    return out


def _safe_load(file: str):
    """torch.load with weights_only=True (tensors and plain data; NumPy arrays for older files):
    unpickling a checkpoint file never runs code from it. CheckpointError naming the file and
    the object it asked for otherwise."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        m = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({m.group(1)})" if m else ""
        raise CheckpointError(f"refusing to load {file}: it holds a Python object{what} that only full unpickling "
                              f"could build, which could run code from the file; pebr writes tensors and plain data "
                              f"only, so this file was not written by it (tampered, or from another tool)") from None


class _MetadataUnpickler(pickle.Unpickler):
    """What torch.distributed.checkpoint's .metadata may name: its own record types (dataclasses and
    enums), dtypes and layouts, torch.Size, paths."""

    def find_class(self, module: str, name: str):
        obj = None
        if module.startswith("torch.distributed.checkpoint.") or module in ("torch", "torch.serialization", "pathlib",
                                                                              "collections"):
            obj = super().find_class(module, name)
        ok = (module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type)
              and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
              or module == "torch" and (isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))
                                        or name == "Size")
              or module == "torch.serialization" and name == "_get_layout"
              or module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath",
                                                  "PureWindowsPath")
              or module == "collections" and name == "OrderedDict")
        if not ok:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed in checkpoint metadata")
        return obj


def _check_dcp_metadata(opt_dir: str) -> None:
    """Unpickle the optimizer's .metadata files with only dcp's own record types (and dtypes,
    sizes, paths) allowed, before torch.distributed.checkpoint unpickles them without limits."""
    for name in os.listdir(opt_dir):
        if name.endswith(".metadata"):
            f = os.path.join(opt_dir, name)
            try:
                with open(f, "rb") as fh:
                    _MetadataUnpickler(fh).load()
            except (pickle.UnpicklingError, AttributeError, ImportError) as exc:
                raise CheckpointError(f"refusing to load {f}: {exc}; pebr's optimizer metadata holds only "
                                      f"torch.distributed.checkpoint's records, so this file was not written by "
                                      f"it (tampered, or from another tool)") from None
