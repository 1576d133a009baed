"""Triton kernels, one file per op: `_<op>_fwd_kernel`, `_<op>_bwd_kernel`, keyword-only launchers.

Imported only when the `triton` backend is selected. On CPU tensors they run only under
`TRITON_INTERPRET=1` (set before import), where `tl.dot` on bf16 is wrong: tests there use fp32.
"""
