"""The optimizer of every stage: AdamW on the trainable parameters, constant LR after a linear
warm-up, and which parts of the model train."""
from __future__ import annotations

import torch


def build_optimizer(model, *, lr: float, weight_decay: float, betas=(0.9, 0.999), warmup_steps: int = 0):
    """AdamW on the trainable parameters + constant LR after a linear warm-up -> (optimizer, scheduler)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    warm = max(0, int(warmup_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


def set_vision_trainable(model, trainable: bool) -> None:
    """Freeze or unfreeze the vision tower (model.model.visual)."""
    for p in model.model.visual.parameters():
        p.requires_grad_(trainable)
