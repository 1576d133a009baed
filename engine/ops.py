"""The public ops. Contracts: `docs/ops.md`; each op lives in `engine/<op>.py`.

Every op dispatches per call (`engine.dispatch.select`) to one of the backends `torch`, `cpp`,
`cuda`, `triton`; all return fp32 log-probs/losses and gradients in the input's dtype.
"""
import importlib

from engine import nvtx

# op name -> the module that defines it: one op, one module, the same name.
_HOME = {name: f"engine.{name}" for name in (
    "token_logprobs", "linear_token_logprobs", "group_advantages", "grpo_loss", "patch_embed", "patchify",
    "patchify_embed",
)}
__all__ = list(_HOME)


def __getattr__(name):
    # Imported on first use so that `import engine.ops` stays cheap (no Triton, no build).
    if name not in _HOME:
        raise AttributeError(f"engine.ops has no op {name!r}; ops: {', '.join(_HOME)}")
    # each call inside a profiler range named engine.ops.<op> (engine/nvtx.py: a flag check without a profiler)
    value = nvtx.ranged(f"engine.ops.{name}")(getattr(importlib.import_module(_HOME[name]), name))
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
