"""Plain PyTorch references of every op: readable, differentiable by autograd, the `torch` backend.

Tests and benchmarks import these; kernels are checked against them (and against fp64
evaluations written independently in the tests). Shapes and semantics: `docs/ops.md`.
"""
from __future__ import annotations

import torch

from engine import _validate
from engine import patch_geometry as _patch_geometry
from engine.grpo_options import KL_TYPES as _GRPO_KL_TYPES

# ---- token_logprobs, linear_token_logprobs ----


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False):
    """logits: [..., V] (any float dtype), ids: [...] int -> logp: [...] fp32 (and entropy: [...] fp32).

    z = logits / temperature; logp = z[id] - logsumexp(z); entropy = logsumexp(z) - sum(softmax(z) * z).
    Materializes fp32 [..., V] intermediates: the memory the kernels exist to avoid.
    """
    z = logits.float() / temperature
    # +inf logits, or finite ones that overflow to +-inf when divided by temperature: ValueError
    _validate.check_rows_finite_max(z.reshape(-1, z.shape[-1]).amax(-1) if z.numel() else z.new_empty(0),
                                    lambda r: logits.reshape(-1, logits.shape[-1])[r], temperature)
    logsm = torch.log_softmax(z, dim=-1)
    logp = logsm.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    p = logsm.exp()
    # entropy = -sum p * log p with log p = log_softmax(z): no cancellation against the logits' offset
    # (lse - sum p*z loses everything for [1e30, 1e30, 3]: log 2 is below 1e30's ulp). A masked entry
    # (p = 0, log p = -inf) adds 0, not NaN; zeroing log p (not the product) keeps backward finite.
    entropy = -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1)
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
# Option names, in the order that is the kernels' codes: engine/grpo_options.py (the one definition).


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """rewards: [B] (B a multiple of group_size) -> adv: [B] fp32, a constant (no gradient, as in EasyR1).

    adv = (r - mean_g) / (std_g + eps) over each group of `group_size` consecutive rows, std unbiased
    (N - 1; a group of one has std 0). scale="batch": std of the whole batch; "none": r - mean_g only.
    Values are shifted by the group's (batch's) first reward before averaging, so a group of equal
    rewards gives exactly 0, not rounding noise divided by eps.
    Computed in fp64 from the rewards rounded to fp32 (what the kernels do): no intermediate
    overflows for any finite fp32 rewards (e.g. +-3e38). Where std + eps is 0 (eps = 0 and a flat
    group or batch) adv is 0. Non-finite rewards are refused by the wrapper (`check_finite_rewards`).
    """
    with torch.no_grad():
        _validate.check_finite("rewards", rewards.detach().float(), "(in fp32, the kernels' precision)")
        flat = rewards.detach().float().double().reshape(-1)
        r = flat.reshape(-1, group_size)
        d = r - r[:, :1]
        centered = d - d.mean(-1, keepdim=True)
        if scale == "none":
            return centered.reshape(-1).float()
        if scale == "group":
            std = (centered.square().sum(-1, keepdim=True) / max(group_size - 1, 1)).sqrt()
        else:  # "batch": one std over all B rewards
            fd = flat - flat[:1]
            fc = fd - fd.mean()
            std = (fc.square().sum() / max(flat.numel() - 1, 1)).sqrt()
        den = std + eps
        adv = torch.where(den > 0, centered / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(centered))
        return adv.reshape(-1).float()


def _grpo_safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # num / den where den > 0, else 0 (an empty mask contributes 0, and its gradient is 0, not NaN)
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _grpo_masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # values * mask where mask != 0, else exactly 0: a masked-out token affects nothing, even a NaN/inf one
    return torch.where(mask != 0, values * mask, torch.zeros_like(values))


def grpo_agg(values: torch.Tensor, mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """values, mask: [B, T] fp32 -> 0-dim: the masked aggregate `loss_agg` of `values`.

    token-mean: sum(v*m) / sum(m) over the batch. seq-mean-*: the mean over all B rows of a per-row
    value: sum(v*m)/sum(m) (token-mean; a row with an empty mask gives 0 and still counts in B, as
    EasyR1's `average_loss(mode="seq")`), sum(v*m) (token-sum) or sum(v*m)/T (token-sum-norm, Dr.GRPO).
    """
    B, T = values.shape
    vm = _grpo_masked(values, mask)
    if loss_agg == "token-mean":
        return _grpo_safe_div(vm.sum(), mask.sum())
    row = vm.sum(-1)
    if loss_agg == "seq-mean-token-mean":
        row = _grpo_safe_div(row, mask.sum(-1))
    elif loss_agg == "seq-mean-token-sum-norm":
        row = row / max(T, 1)
    return row.sum() / max(B, 1)


def grpo_kl(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate of the policy to the reference (EasyR1 `compute_kl`), fp32."""
    if kl_type == "low_var_kl":  # k3, clamped for stability as in EasyR1
        d = (ref_logp - logp).clamp(-20.0, 20.0)
        return (d.exp() - d - 1).clamp(-10.0, 10.0)
    if kl_type == "kl":
        return logp - ref_logp
    if kl_type == "abs":
        return (logp - ref_logp).abs()
    if kl_type == "mse":
        return 0.5 * (logp - ref_logp).square()
    raise ValueError(f"kl_type must be one of {_GRPO_KL_TYPES}, got {kl_type!r}")


def grpo_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: float | None = 3.0,
    kl_coef: float = 0.0,
    kl_type: str = "low_var_kl",
    loss_agg: str = "token-mean",
):
    """logp: [B, T], advantages: [B] or [B, T], mask: [B, T] (bool or float weights) -> (loss, metrics).

    EasyR1's clipped policy loss plus a KL loss (docs/ops.md#grpo_loss):
      old = old_logp (or logp.detach()); ratio = exp(clamp(logp - old, -20, 20))
      pg = max(-A*ratio, -A*clamp(ratio, 1-clip_low, 1+clip_high)); where A < 0 (dual_clip set):
      pg = min(pg, -A*dual_clip). kl = grpo_kl(logp, ref_logp) when ref_logp is given (else no KL
      term: kl_coef is then unused). loss = agg(pg) + kl_coef * agg(kl).
    Gradient flows into logp only: old_logp, ref_logp, advantages and mask are constants.
    metrics (0-dim fp32, detached, masked token-means): clipfrac_high (pg1 < pg2: the ratio clip is
    active), clipfrac_low (A < 0 and the dual clip is active; 0 when dual_clip is None), ppo_kl
    (old - logp), kl (0 without ref_logp).
    """
    lp = logp.float()
    old = lp.detach() if old_logp is None else old_logp.detach().float()
    adv = advantages.detach().float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    m = mask.detach().float()
    # masked-out tokens must affect nothing (not even through 0 * NaN, forward or backward): their
    # inputs are replaced by 0 before any arithmetic, and every masked sum selects (not multiplies)
    on = m != 0
    lp = torch.where(on, lp, torch.zeros_like(lp))
    old = torch.where(on, old, torch.zeros_like(old))
    adv = torch.where(on, adv, torch.zeros_like(adv))
    ratio = torch.exp((lp - old).clamp(-20.0, 20.0))
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    with torch.no_grad():
        high_hit = (pg1 < pg2).float()
        low_hit = torch.zeros_like(pg) if dual_clip is None else ((adv < 0) & (pg > -adv * dual_clip)).float()
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    loss = grpo_agg(pg, m, loss_agg)
    kl = None
    if ref_logp is not None:
        ref = ref_logp.detach().float()
        kl = grpo_kl(lp, torch.where(on, ref, torch.zeros_like(ref)), kl_type)
        loss = loss + kl_coef * grpo_agg(kl, m, loss_agg)
    with torch.no_grad():
        n = m.sum()
        zero = torch.zeros((), dtype=torch.float32, device=lp.device)
        metrics = {
            "clipfrac_high": _grpo_safe_div(_grpo_masked(high_hit, m).sum(), n),
            "clipfrac_low": _grpo_safe_div(_grpo_masked(low_hit, m).sum(), n),
            "ppo_kl": zero.clone() if old_logp is None else _grpo_safe_div(_grpo_masked(old - lp, m).sum(), n),
            "kl": zero.clone() if kl is None else _grpo_safe_div(_grpo_masked(kl, m).sum(), n),
        }
    return loss, metrics

# ---- patch_embed, patchify, patchify_embed ----
# (the processor's settings, and their checks, are one `PatchGeometry`: engine/patch_geometry.py)

OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = _patch_geometry.OPENAI_CLIP_MEAN, _patch_geometry.OPENAI_CLIP_STD
_DEFAULT_GEOMETRY = _patch_geometry.PatchGeometry()


def patch_embed(pixel_values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """pixel_values: [N, C*Tp*P*P], weight: [D, C, Tp, P, P], bias: [D] -> [N, D] in weight's dtype.

    Qwen-VL's PatchEmbed Conv3d (kernel == stride, one output per patch) is exactly this GEMM.
    """
    return torch.nn.functional.linear(pixel_values, weight.reshape(weight.shape[0], -1), bias)


def _image_list(images) -> list[torch.Tensor]:
    """[B, C, H, W] / [C, H, W] tensor or a list of [C, H, W] / [B, C, H, W] tensors -> list of [C, H, W]."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    out = []
    for t in items:
        out.extend(t.unbind(0) if t.dim() == 4 else [t])
    return out


def patchify(images, *, geometry: _patch_geometry.PatchGeometry = _DEFAULT_GEOMETRY):
    """images: [B, C, H, W] or [C, H, W] (uint8 or float) or a list of them -> (pixel_values: [N, C*Tp*P*P] fp32,
    grid_thw: [B, 3] int64), N = sum over images of (H/P)*(W/P). The settings: `geometry`.

    Qwen2VLImageProcessor's layout (H, W multiples of P*merge_size): x = (pixel*rescale - mean)/std per channel
    (rescaled in float64 and rounded once to float32, as the processor does); patch rows in merge-block order
    (block row, block col, row in block, col in block); features ordered (channel, frame, row, col) with the
    one frame repeated Tp times.
    """
    g = geometry
    P, Tp, M = g.patch_size, g.temporal_patch_size, g.merge_size
    rows, grids = [], []
    for img in _image_list(images):
        C, H, W = img.shape
        x = (img.double() * g.rescale).float()
        m = torch.tensor(g.mean, dtype=torch.float32, device=img.device).view(C, 1, 1)
        s = torch.tensor(g.std, dtype=torch.float32, device=img.device).view(C, 1, 1)
        x = (x - m) / s
        gh, gw = H // P, W // P
        x = x.reshape(C, gh // M, M, P, gw // M, M, P).permute(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, mh, mw, C, ph, pw)
        x = x.unsqueeze(5).expand(*x.shape[:5], Tp, P, P)
        rows.append(x.reshape(gh * gw, C * Tp * P * P))
        grids.append([1, gh, gw])
    first = images[0] if isinstance(images, (list, tuple)) else images  # for an empty batch's shape and device
    if not rows:
        pixel_values = torch.empty(0, first.shape[-3] * Tp * P * P, device=first.device)
    else:
        pixel_values = torch.cat(rows)
    return pixel_values, torch.tensor(grids, dtype=torch.int64, device=first.device).reshape(-1, 3)


def patchify_embed(
    images, weight: torch.Tensor, bias: torch.Tensor | None = None, *, geometry: _patch_geometry.PatchGeometry = _DEFAULT_GEOMETRY
):
    """images as in `patchify`, weight: [D, C, Tp, P, P], bias: [D] -> (embeds: [N, D] in weight's dtype, grid_thw: [B, 3]).

    The composition the fused kernels replace: patch_embed(patchify(images)) with the fp32 patches cast to
    the weight's dtype (what the model's PatchEmbed does).
    """
    pixel_values, grid_thw = patchify(images, geometry=geometry)
    return patch_embed(pixel_values.to(weight.dtype), weight, bias), grid_thw
