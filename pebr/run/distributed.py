"""Data parallelism over whole GRPO groups, on PyTorch's own stack (torchrun, gloo/nccl, FSDP2).

    world = init_world(device="cpu", backend="auto")     # a world of one without torchrun
    mine = world.share(step_prompt_indices, mini_batch)   # this rank's prompts of the step
    total = world.sum([tokens, sequences])                # float sums over every rank
    world.close()

A step's P prompts are one global order (the same seed on every rank). Each global mini-batch of
`mini` prompts is cut into W consecutive equal shares, rank r taking share r of every mini-batch,
so the union of the ranks' j-th local mini-batches is exactly the 1-rank run's j-th mini-batch:
a W-rank update reproduces the 1-rank update of the same rollouts (up to fp32 summation order).
A group's n responses, rewards and advantages never leave their rank.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; without them (plain `python -m ...`) this is a
world of one and no process group is created. Backend `auto`: nccl for CUDA, gloo for CPU.
A collective waits at most `timeout_s`, so a dead rank ends the job with an error, not a hang
(torchrun also stops the other ranks when one exits non-zero).
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class World:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group (a world of one)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics and the model folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def share(self, indices: list[int], mini: int) -> list[int]:
        """This rank's part of a step's prompt indices: share `rank` of each block of `mini`.

        indices: the step's P prompts in the global order; P and mini must be multiples of W.
        """
        W = self.world_size
        if W == 1:
            return list(indices)
        out = []
        for m0 in range(0, len(indices), mini):
            block = indices[m0 : m0 + mini]
            if len(block) % W:
                raise ValueError(f"each mini-batch of prompts ({len(block)} here) must be a multiple of the world size "
                                 f"{W}: every rank takes an equal share of it")
            k = len(block) // W
            out += block[self.rank * k : (self.rank + 1) * k]
        return out

    def sum(self, values) -> torch.Tensor:
        """Elementwise sum over ranks of a list of floats (or a float tensor) -> fp64 CPU tensor."""
        return self._all_reduce(values, "SUM")

    def max(self, values) -> torch.Tensor:
        """Elementwise max over ranks -> fp64 CPU tensor."""
        return self._all_reduce(values, "MAX")

    def _all_reduce(self, values, op: str) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=torch.float64).clone()
        if self.distributed:
            t = t.to(self._comm_device())
            dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.cpu()

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        # nccl reduces CUDA tensors only; gloo CPU tensors
        return self.device if self.backend == "nccl" else torch.device("cpu")


def seed_all(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; ranks draw distinct streams (their rollouts must not repeat
    each other's), rank 0 the stream of a world of one."""
    import random

    import numpy as np

    seed = seed + 1_000_003 * rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_backend(backend: str, device_type: str) -> str:
    """auto -> nccl for CUDA, gloo for CPU; an explicit name is checked and kept."""
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"dist_backend must be auto, nccl or gloo, got {backend!r}")
    if backend == "nccl" and device_type != "cuda":
        raise ValueError("dist_backend nccl needs --device cuda; use gloo (or auto) on the CPU")
    return backend


def init_world(*, device: str = "cpu", backend: str = "auto", timeout_s: float | None = None) -> World:
    """The World of this process; under torchrun, also the default process group.

    device: cpu | cuda (each rank takes cuda:LOCAL_RANK). timeout_s: how long a collective waits
    for a missing rank before the job fails (default: $PEBR_DIST_TIMEOUT_S, else 600 s; rollouts
    and checkpoints of big models happen between collectives, so it must exceed the longest).
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get("PEBR_DIST_TIMEOUT_S", 600))
    device_type = torch.device(device).type
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1 and not dist.is_initialized():
        return World(device=torch.device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = resolve_backend(backend, device_type)
    dev = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if device_type == "cuda" else None)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)
