"""Plain PyTorch references of every op: readable, differentiable by autograd, the `torch` backend.

Tests and benchmarks import these; kernels are checked against them (and against fp64
evaluations of the same formulas). Shapes and semantics: `../shared/DESIGN.md` section 1.
"""
from __future__ import annotations

import torch

# ---- token_logprobs, linear_token_logprobs ----


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False):
    """logits: [..., V] (any float dtype), ids: [...] int -> logp: [...] fp32 (and entropy: [...] fp32).

    z = logits / temperature; logp = z[id] - logsumexp(z); entropy = logsumexp(z) - sum(softmax(z) * z).
    Materializes fp32 [..., V] intermediates: the memory the kernels exist to avoid.
    """
    z = logits.float() / temperature
    logsm = torch.log_softmax(z, dim=-1)
    logp = logsm.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    p = logsm.exp()
    # a masked entry (z = -inf, p = 0) adds 0, not NaN; zeroing z (not the product) keeps backward finite
    pz = p * torch.where(p > 0, z, torch.zeros_like(z))
    entropy = torch.logsumexp(z, dim=-1) - pz.sum(-1)
    return logp, entropy


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
):
    """hidden: [..., H], weight: [V, H], ids: [...], bias: [V] -> token_logprobs(hidden @ weight.T + bias, ids).

    Materializes the full [..., V] logits (chunk_size is accepted for signature parity, unused).
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprobs(logits, ids, temperature=temperature, return_entropy=return_entropy)

# ---- group_advantages, grpo_loss ----

# ---- patch_embed, patchify, patchify_embed ----
