"""A tied LM head and input embedding (Qwen2.5-VL-3B ties them: one [151,936, 2,048] matrix) with one
dense gradient instead of two.

    install_tied_embedding_grad(model)   # once, at load; a no-op for an untied model

Why: the weight is one leaf used twice. The fused head op's backward gives a dense [V, H] dW; the
embedding's backward gives another dense [V, H] (zeros plus the rows of the tokens seen), and autograd
keeps the first in its input buffer until the second arrives, then adds them: two 1.16 GiB fp32
matrices at once at the 3B head, for an embedding gradient with a few hundred non-zero rows
(measured alone: 2.35 GiB peak tied, 1.29 untied; a sparse embedding gradient does not help, since
autograd adds it to the dense one out of place: bench/RESULTS.md, 2026-12-08).

How: a forward hook on the input embedding cuts its autograd edge to the weight and puts in its
place a node whose backward adds the rows of the tokens seen into `weight.grad` in place
(`index_add_`, padding rows skipped as nn.Embedding skips them). The head's dW then reaches the
weight alone and becomes its `.grad` (autograd runs AccumulateGrad nodes as soon as they are ready,
so the head's, computed first, is there before the embedding's rows are added). The gradient is
the same sum, in another order.

Only in a world of one: under FSDP2 the sharded weight's gradient is reduced from the unsharded
one by FSDP's own hooks, which this does not touch (the default path runs there).
"""
from __future__ import annotations

import torch


class _RowsIntoWeightGrad(torch.autograd.Function):
    """Identity on the embeddings; backward adds their gradient's rows into weight.grad.

    The weight is not an input of this node (only held by it): as an input it would be a second
    edge into the weight's AccumulateGrad, which would then wait for this node and hold the head's
    dW meanwhile, the very second copy this avoids. `anchor`, an empty leaf that requires grad,
    makes the output require grad instead."""

    @staticmethod
    def forward(ctx, embeds, ids, anchor, weight_box, padding_idx):
        ctx.save_for_backward(ids)
        (ctx.weight,), ctx.padding_idx = weight_box, padding_idx  # boxed: a tensor argument is an input
        return embeds.view_as(embeds)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        rows, g = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:  # nn.Embedding gives the padding row no gradient
            keep = rows != ctx.padding_idx
            rows, g = rows[keep], g[keep]
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, rows, g.to(weight.grad.dtype))
        return None, None, None, None, None


def _is_tied(model, embedding: torch.nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is embedding.weight


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def install_tied_embedding_grad(model) -> bool:
    """Hook `model`'s input embedding when it shares its weight with the LM head -> whether it did."""
    embedding = model.get_input_embeddings()
    if embedding is None or not _is_tied(model, embedding) or getattr(embedding, "_pebr_tied_grad", False):
        return False

    def hook(module, args, output):
        weight = module.weight
        if not (torch.is_grad_enabled() and weight.requires_grad) or _distributed() or not _is_tied(model, module):
            return None  # rollouts, frozen weights, sharded runs: the default path
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor):
            return None
        anchor = torch.empty(0, device=weight.device, requires_grad=True)
        return _RowsIntoWeightGrad.apply(output.detach(), ids, anchor, (weight,), module.padding_idx)

    embedding.register_forward_hook(hook)
    embedding._pebr_tied_grad = True
    return True
