"""Atomic checkpoints: an HF folder (safetensors + tokenizer + preprocessor) plus trainer state.

    ckpt = Checkpointer(root)                          # root = output_dir/stage{k}/checkpoints
    ckpt.save(step, policy, state, world=world, optimizer=opt, rng=rng_state())
                                                       # -> root/step_0000040, then `latest` -> it
    path = ckpt.latest()                               # newest complete checkpoint or None
    path = resolve_model_path("runs/stage2")           # --model: HF, stage or checkpoints folder, or `latest`
    state = load_trainer_state(path)                   # step, data position, schedule, config
    ckpt.load_optimizer(path, model, opt, state)       # at any world size
    rng = ckpt.load_rng(path, rank)                    # this rank's RNG streams, or None

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
The model folder is an ordinary `save_pretrained` folder: transformers loads it as is.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
LEGACY_STATE_FILE = "trainer_state.pt"  # checkpoints written before torch.distributed.checkpoint
OPTIMIZER_DIR = "optimizer"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def _is_complete(path: str) -> bool:
    has_state = any(os.path.isfile(os.path.join(path, f)) for f in (STATE_FILE, LEGACY_STATE_FILE))
    return has_state and os.path.isfile(os.path.join(path, "config.json"))


def _complete_steps(root: str) -> list[int]:
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and _is_complete(os.path.join(root, name)):
            out.append(int(m.group(1)))
    return sorted(out)


def find_latest(root: str | os.PathLike) -> str | None:
    """The checkpoint under `root` that its `latest` pointer names, or the newest complete one if
    the pointer is missing or stale; None when there is none (or no `root`). Creates nothing."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return None
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        cand = os.path.join(root, name)
        if name and _is_complete(cand):
            return cand
    steps = _complete_steps(root)
    return os.path.join(root, f"step_{steps[-1]:07d}") if steps else None


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

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:07d}")

    def latest(self) -> str | None:
        """The checkpoint `latest` names, or the newest complete one if the pointer is missing/stale."""
        return find_latest(self.root)

    def save(self, step: int, policy, state: dict, *, world=None, optimizer=None, rng: dict | None = None) -> str:
        """Write checkpoint `step` atomically, point `latest` at it, prune old ones -> its path.

        policy: its model's full state dict goes to the HF folder; state: JSON-able trainer state;
        optimizer: saved through torch.distributed.checkpoint; rng: this rank's RNG state. Under
        data parallelism every rank calls this (collectives inside).
        """
        from pebr.distributed import World
        from pebr.fsdp import full_state_dict

        world = world or World()
        final = self.path(step)
        tmp = world.broadcast_object(tempfile.mkdtemp(prefix=f".tmp-step_{step:07d}-", dir=self.root)
                                     if world.is_main else None)
        # Sharded: gather the full weights to rank 0. A world of one lets save_pretrained read the model
        # itself, as before scale-out (it knows the model's tied weights; a plain dict would not say).
        model_state = full_state_dict(policy.model, distributed=True) if world.distributed else None
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
            policy.save(tmp, state_dict=model_state)
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f, indent=1)
        world.barrier()  # every rank's files are in tmp
        if world.is_main:
            _make_readable(tmp)
            _chmod_add(self.root, 0o755)
            _fsync_tree(tmp)
            if os.path.exists(final):  # a re-run of the same step: move the old one out of the way first
                self._trash(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._point_latest(os.path.basename(final))
            self._prune(keep_name=os.path.basename(final))
        world.barrier()  # nobody returns before the checkpoint is visible
        return final

    def load_optimizer(self, path: str, model, optimizer, state: dict | None = None) -> None:
        """Restore the optimizer saved with checkpoint `path`, at this run's world size."""
        opt_dir = os.path.join(path, OPTIMIZER_DIR)
        if os.path.isdir(opt_dir):
            import torch.distributed as dist
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

            osd = get_optimizer_state_dict(model, optimizer)  # the layout to read into (state initialized)
            box = {"optimizer": osd}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*single process.*")
                dcp.load(box, checkpoint_id=opt_dir, no_dist=not dist.is_initialized())
            set_optimizer_state_dict(model, optimizer, box["optimizer"])
        elif state is not None and "optimizer" in state:  # a legacy checkpoint: a plain state dict
            optimizer.load_state_dict(state["optimizer"])

    def load_rng(self, path: str, rank: int) -> dict | None:
        """Rank `rank`'s RNG state saved with `path` (None when that rank did not exist then)."""
        f = os.path.join(path, f"rng_rank{rank}.pt")
        if os.path.isfile(f):
            return torch.load(f, map_location="cpu", weights_only=False)
        state = None
        legacy = os.path.join(path, LEGACY_STATE_FILE)
        if rank == 0 and os.path.isfile(legacy):
            state = torch.load(legacy, map_location="cpu", weights_only=False).get("rng")
        return state

    def _point_latest(self, name: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-latest-", dir=self.root)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.root, LATEST))
        _fsync_dir(self.root)

    def _trash(self, path: str) -> None:
        trash = tempfile.mkdtemp(prefix=".trash-", dir=self.root)
        os.rename(path, os.path.join(trash, os.path.basename(path)))  # atomic: gone from view at once
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self, *, keep_name: str) -> None:
        steps = self.steps()
        for s in steps[: max(0, len(steps) - self.keep)]:
            if os.path.basename(self.path(s)) != keep_name:
                self._trash(self.path(s))

    def clear(self) -> None:
        """Remove every checkpoint (a fresh run in a used folder)."""
        pointer = os.path.join(self.root, LATEST)
        if os.path.exists(pointer):
            os.remove(pointer)
        for s in self.steps():
            self._trash(self.path(s))
        self.sweep()


def resolve_model_path(path: str | os.PathLike) -> str:
    """What `--model PATH` names -> an HF model folder. PATH may be an HF folder, a stage folder
    (OUT/stageK: its latest checkpoint), a checkpoints folder (its latest checkpoint) or the
    `latest` pointer file in one. ValueError saying what was found otherwise."""
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) == LATEST:
        root = os.path.dirname(os.path.abspath(path))
        found = find_latest(root)
        if found is None:
            raise ValueError(f"--model {path}: names no complete checkpoint in {root}")
        return found
    if not os.path.isdir(path):
        raise ValueError(f"--model {path}: no such folder")
    if _is_hf_folder(path):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root) and (os.path.isfile(os.path.join(root, LATEST)) or
                                    any(_STEP_DIR.match(n) for n in os.listdir(root))):
            found = find_latest(root)
            if found is None:
                raise ValueError(f"--model {path}: {root} holds no complete checkpoint (a run killed before its first save?)")
            return found
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise ValueError(f"--model {path}: {os.path.join(path, 'checkpoints')} holds no checkpoint yet")
    raise ValueError(f"--model {path}: not a model folder (no config.json with model weights), a stage folder "
                     f"(OUT/stageK with checkpoints/) or a checkpoints folder")


def _is_hf_folder(path: str) -> bool:
    """config.json of a model (not a stage's TrainConfig) beside its weights."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "model_type" in doc


def load_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer state saved with a checkpoint: step, data_position, scheduler, config, init_model."""
    f = os.path.join(path, STATE_FILE)
    if os.path.isfile(f):
        with open(f) as fh:
            return json.load(fh)
    # checkpoints written before trainer_state.json (our own file: full unpickling is fine)
    return torch.load(os.path.join(path, LEGACY_STATE_FILE), map_location="cpu", weights_only=False)


def rng_state() -> dict:
    """Every RNG a run draws from: Python, NumPy, torch CPU (and CUDA where present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DataOrder:
    """A reproducible stream of item indices: a fresh permutation of range(n) per epoch from `seed`.

    `position` (items consumed so far) is all the state: a resumed run sees the same order.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, position: int = 0):
        if n < 1:
            raise ValueError(f"the data holds no items (n={n})")
        self.n, self.seed, self.shuffle, self.position = n, seed, shuffle, position
        self._epoch, self._perm = -1, None

    @property
    def epoch(self) -> int:
        return self.position // self.n

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
            self._epoch = epoch
        return self._perm

    def take(self, k: int) -> list[int]:
        """The next k indices (wrapping into the next epoch's permutation)."""
        out = []
        for _ in range(k):
            out.append(self._order(self.position // self.n)[self.position % self.n])
            self.position += 1
        return out
