"""The optimizer of every stage: AdamW on the trainable parameters, constant LR after a linear
warm-up, and which parts of the model train."""
from __future__ import annotations

import torch


def fused_adamw_ok(params: list) -> bool:
    """Whether torch's fused AdamW takes these parameters: plain tensors (FSDP2's DTensor shards keep
    the default multi-tensor path) on the CPU or a CUDA GPU, in fp32, bf16 or fp16."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        DTensor = ()
    return all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda")
               and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)


def build_optimizer(model, *, lr: float, weight_decay: float, betas=(0.9, 0.999), warmup_steps: int = 0):
    """AdamW on the trainable parameters + constant LR after a linear warm-up -> (optimizer, scheduler).

    The fused AdamW where torch has it for the parameters (fused_adamw_ok): one kernel per
    parameter that updates it and its moments in place. The default multi-tensor (foreach) AdamW
    allocates whole-model temporaries in its step: at Qwen2.5-VL-3B's widths with one decoder layer
    (446M parameters, fp32, 2-core EPYC) its step peaked 2.3 GB above the weights, gradients and
    moments, which is more than the rollout, the reference pass and the backward took together
    (bench/RESULTS.md, 2026-12-07)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                            fused=True if fused_adamw_ok(params) else None)
    warm = max(0, int(warmup_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


def set_vision_trainable(model, trainable: bool) -> None:
    """Freeze or unfreeze the vision tower (model.model.visual)."""
    for p in model.model.visual.parameters():
        p.requires_grad_(trainable)
