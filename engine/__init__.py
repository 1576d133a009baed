"""PeBR Engine: kernels for RL training of vision-language models.

    import engine.ops
    logp = engine.ops.token_logprobs(logits, ids)          # logits: [..., V], ids: [...]
    with engine.backend("torch"):                           # force the reference
        ...
    engine.available_backends()                             # e.g. ['torch', 'cpp']
"""
from engine.dispatch import BACKENDS, available_backends, backend

__all__ = ["BACKENDS", "available_backends", "backend"]
__version__ = "0.1.0"
