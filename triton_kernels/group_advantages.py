"""GRPO group-normalized advantages in Triton: adv = (r - mean_g) / (std_g + eps).

All arithmetic in fp64 (rounded once to fp32), as the C++ and CUDA kernels: no overflow for any finite
fp32 rewards. `_group_advantages_fwd_kernel`: each program takes GROUPS consecutive groups as a [GROUPS, BLOCK_G]
tile and reduces along the group (a fixed-order tree: deterministic). scale="batch" first runs
`_batch_std_kernel`, one program looping over the batch in a fixed order. Values are shifted by the
group's (batch's) first reward, so a group of equal rewards gives exactly 0.
Semantics: docs/ops.md#group_advantages (readable version: `engine.reference.group_advantages`).
"""
import torch
import triton
import triton.language as tl

# option name -> the code the kernel branches on. A copy (triton_kernels must not import engine) of
# engine/grpo_options.py's ADVANTAGE_SCALES, whose order is the code; tests/test_grpo_options.py
# keeps them equal.
ADVANTAGE_SCALES = {"group": 0, "batch": 1, "none": 2}


@triton.jit
def _batch_std_kernel(r_ptr, std_ptr, par_ptr, B, BLOCK: tl.constexpr, N_ITERS: tl.constexpr):
    # N_ITERS = cdiv(B, BLOCK) is a constexpr: see triton_kernels/grpo_loss.py. In fp64, as the C++
    # and CUDA kernels: no intermediate overflows for any finite fp32 rewards (e.g. +-3e38).
    offs0 = tl.arange(0, BLOCK)
    r0 = tl.load(r_ptr).to(tl.float64)
    acc = tl.zeros((BLOCK,), tl.float64)
    for it in range(N_ITERS):
        offs = it * BLOCK + offs0
        acc += tl.where(offs < B, tl.load(r_ptr + offs, mask=offs < B, other=0.0).to(tl.float64) - r0, 0.0)
    mean = tl.sum(acc, axis=0) / tl.load(par_ptr + 3)  # par: (eps, G, max(G-1, 1), B, max(B-1, 1))
    acc2 = tl.zeros((BLOCK,), tl.float64)
    for it in range(N_ITERS):
        offs = it * BLOCK + offs0
        c = tl.load(r_ptr + offs, mask=offs < B, other=0.0).to(tl.float64) - r0 - mean
        acc2 += tl.where(offs < B, c * c, 0.0)
    tl.store(std_ptr, tl.sqrt(tl.sum(acc2, axis=0) / tl.load(par_ptr + 4)))


@triton.jit
def _group_advantages_fwd_kernel(
    r_ptr, out_ptr, std_ptr, par_ptr, num_groups, G, SCALE: tl.constexpr, BLOCK_G: tl.constexpr, GROUPS: tl.constexpr
):
    # fp64 throughout (see _batch_std_kernel); eps and the divisors come as fp64 scalars in memory,
    # par = (eps, G, max(G-1, 1), B, max(B-1, 1)) (a Python float argument would be passed as fp32)
    grp = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)[:, None]
    col = tl.arange(0, BLOCK_G)[None, :]
    ok = (grp < num_groups) & (col < G)
    idx = grp.to(tl.int64) * G + col
    r = tl.load(r_ptr + idx, mask=ok, other=0.0).to(tl.float64)
    r0 = tl.load(r_ptr + grp.to(tl.int64) * G, mask=grp < num_groups, other=0.0).to(tl.float64)
    d = tl.where(ok, r - r0, 0.0)
    mean = tl.sum(d, axis=1) / tl.load(par_ptr + 1)
    c = tl.where(ok, d - mean[:, None], 0.0)
    if SCALE == 2:
        adv = c
    else:
        if SCALE == 0:
            std = tl.sqrt(tl.sum(c * c, axis=1) / tl.load(par_ptr + 2))[:, None]
        else:
            std = tl.load(std_ptr)
        den = std + tl.load(par_ptr)
        adv = tl.where(den > 0.0, c / tl.where(den > 0.0, den, 1.0), 0.0)  # eps = 0 and a flat group: 0
    tl.store(out_ptr + idx, adv.to(tl.float32), mask=ok)


def group_advantages_fwd(*, rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """rewards: [B] contiguous float -> adv: [B] fp32."""
    B = rewards.shape[0]
    out = torch.empty((B,), device=rewards.device, dtype=torch.float32)
    if B == 0:
        return out
    std = torch.zeros((1,), device=rewards.device, dtype=torch.float64)
    par = torch.tensor([float(eps), group_size, max(group_size - 1, 1), B, max(B - 1, 1)], dtype=torch.float64)
    par = par.to(rewards.device)
    if scale == "batch":
        block = max(16, min(triton.next_power_of_2(B), 4096))
        _batch_std_kernel[(1,)](rewards, std, par, B, BLOCK=block, N_ITERS=triton.cdiv(B, block))
    block_g = max(2, triton.next_power_of_2(group_size))
    groups = max(1, min(64, 4096 // block_g))
    num_groups = B // group_size
    _group_advantages_fwd_kernel[(triton.cdiv(num_groups, groups),)](
        rewards, out, std, par, num_groups, group_size, SCALE=ADVANTAGE_SCALES[scale],
        BLOCK_G=block_g, GROUPS=groups,
    )
    return out
