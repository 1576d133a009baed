"""The public ops. Contracts: `../shared/DESIGN.md` section 1; each lives in its own module.

Every op dispatches per call (`engine.dispatch.select`) to one of the backends `torch`, `cpp`,
`cuda`, `triton`; all return fp32 log-probs/losses and gradients in the input's dtype.
"""
import importlib

# op name -> the module that defines it (one module per op family).
_HOME = {
    "token_logprobs": "engine.token_logprobs",
    "linear_token_logprobs": "engine.linear_token_logprobs",
    "group_advantages": "engine.grpo",
    "grpo_loss": "engine.grpo",
    "patch_embed": "engine.vision",
    "patchify": "engine.vision",
    "patchify_embed": "engine.vision",
}
__all__ = list(_HOME)


def __getattr__(name):
    # Imported on first use so that `import engine.ops` stays cheap (no Triton, no build).
    if name not in _HOME:
        raise AttributeError(f"engine.ops has no op {name!r}; ops: {', '.join(_HOME)}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
