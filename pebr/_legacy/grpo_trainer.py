"""`pebr.grpo_trainer` before the recipe layer moved into packages: its names, from their new homes."""
from pebr.trainers.base import peak_mem_mb  # noqa: F401
from pebr.trainers.grpo import *  # noqa: F401,F403
from pebr.trainers.grpo import ROLLOUT_OLD_LOGP_TOL, SUMMED, GRPOTrainer, MicroBatch  # noqa: F401
from pebr.trainers.optim import build_optimizer, set_vision_trainable  # noqa: F401
