"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the policy and the frozen reference model.

    runner = shard_model(model, mixed_bf16=True, cpu_offload=False)   # each vision block, decoder layer, root
    logp = runner(response_logprobs_fn, ...)    # any computation with the model runs inside the root's forward
    with gathered(runner):                      # rollouts: one all-gather per module for the whole
        runner(generate_fn, ...)                #   generation, not one per decode step

Why a `Runner` root: our training forward calls the vision tower, the language model and then the
fused LM-head op on the last hidden states (`engine.ops.linear_token_logprobs` with the head's
weight), never `model.forward`. FSDP2 unshards the root's own parameters (embeddings, LM head,
final norm) in the root's forward hook and keeps them gathered until backward; so the whole
computation runs inside `Runner.forward`, and the LM head's weight is gathered once per
micro-batch, as the op needs it whole.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn


class Runner(nn.Module):
    """The FSDP root: `runner(fn, *args, **kw)` returns `fn(model, *args, **kw)` inside its forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def shardable_blocks(model: nn.Module) -> list[nn.Module]:
    """The vision blocks and decoder layers of a Qwen2-VL / Qwen2.5-VL model (the FSDP units)."""
    base = model.model
    blocks = list(getattr(base.visual, "blocks", []))
    text = getattr(base, "language_model", base)
    blocks += list(text.layers)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: found no vision blocks or decoder layers to shard")
    return blocks


def shard_model(model: nn.Module, *, mixed_bf16: bool = False, cpu_offload: bool = False) -> Runner:
    """fully_shard each vision block and decoder layer, then the Runner root; needs a process group.

    mixed_bf16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): compute in bf16, reduce
    gradients in fp32, keep fp32 master weights. cpu_offload: CPUOffloadPolicy (sharded parameters,
    gradients and optimizer states live on the CPU; the optimizer step runs there); a no-op for a
    model that is on the CPU already.
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    kw: dict[str, Any] = {}
    if mixed_bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Offloading moves GPU shards to pinned CPU memory; on a CPU run they are there already (and
    # pinning needs an accelerator), so it is skipped.
    offload = cpu_offload and torch.cuda.is_available() and next(model.parameters()).device.type == "cuda"
    kw["offload_policy"] = CPUOffloadPolicy() if offload else OffloadPolicy()
    for block in shardable_blocks(model):
        fully_shard(block, **kw)
    runner = Runner(model)
    fully_shard(runner, **kw)
    runner(lambda m: None)  # FSDP's lazy init picks the root at its first forward: make it the Runner, now
    # ...and reshard it: the root keeps its parameters gathered after a forward, and an optimizer
    # built now must see the sharded parameters, not the gathered copies FSDP throws away.
    runner.reshard()
    return runner


def fsdp_modules(runner: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in runner.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(runner: nn.Module):
    """Every parameter unsharded for the whole block (rollouts), resharded after it.

    Inside, forwards issue no collectives, so ranks may run different numbers of decode steps
    (their responses end at different lengths) without waiting on each other.
    """
    mods = fsdp_modules(runner)
    if not mods:  # a plain model: nothing to gather
        yield
        return
    for m in mods:
        m.unshard()
    for m in mods:
        if m is not runner:
            m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            if m is not runner:
                m.set_reshard_after_forward(True, recurse=False)
        for m in mods:
            m.reshard()


def full_state_dict(model: nn.Module, *, distributed: bool, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's full state dict on the CPU (for the HF folder): gathered to rank 0 under FSDP
    (other ranks get {}), the plain state dict otherwise. Every rank must call it.
    trainable_only: the parameters that train (a LoRA checkpoint's adapter), nothing frozen gathered."""
    if not distributed:
        if trainable_only:
            return {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=trainable_only))
