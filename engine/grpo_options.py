"""The option names of the GRPO ops, defined once, in the order of their integer codes.

    engine.ops.grpo_loss(..., kl_type="low_var_kl", loss_agg="token-mean")
    engine.ops.group_advantages(..., scale="group")

Position = code: the kernels pass an option as `names.index(option)`, so `KL_TYPES[3]` is kernel
code 3 everywhere. The C++/CUDA kernels spell the same lists in `csrc/grpo_math.h`
(`kKlTypeNames`, ...) and the Triton launchers keep a `{name: code}` copy (triton_kernels must not
import engine); `tests/test_grpo_options.py` checks that all three agree, names and order.
Meanings: docs/ops.md#grpo_loss and docs/ops.md#group_advantages.
"""

# per-token KL estimate of the policy to the reference: k3 (clamped), k1, |k1|, k1^2 / 2
KL_TYPES = ("low_var_kl", "kl", "abs", "mse")
# how the masked per-token terms become one loss (Σ over the batch / Σmask, or the mean over rows
# of a per-row mean, sum, or sum / T)
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# what advantages are divided by: the group's std, the batch's std, nothing (Dr.GRPO)
ADVANTAGE_SCALES = ("group", "batch", "none")

__all__ = ["KL_TYPES", "LOSS_AGGS", "ADVANTAGE_SCALES"]
