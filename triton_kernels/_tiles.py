"""Pieces the Triton GEMM-shaped kernels share (patch_embed, patchify, patchify_embed): which tile a
program owns, and one tl.dot step with torch's fp32 precision. Inlined into each kernel by Triton."""
import triton
import triton.language as tl


@triton.jit
def tile(size_m, size_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile (grid axes 0 and 1) of an [size_m, size_n] output -> (rows [BLOCK_M],
    columns [BLOCK_N], rows < size_m, columns < size_n)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm < size_m, rn < size_n


@triton.jit
def dot_acc(acc, a, b, IEEE: tl.constexpr):
    """acc + a @ b, accumulated in acc's fp32; IEEE (fp32 inputs): exact fp32 products, no TF32,
    to match torch's default."""
    if IEEE:
        acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc += tl.dot(a, b)
    return acc
