"""`pebr.checkpoint` before the recipe layer moved into packages: its names, from their new homes."""
from pebr.data.order import DataOrder  # noqa: F401
from pebr.recipe.paths import trained_difficulty  # noqa: F401
from pebr.run.checkpoint import *  # noqa: F401,F403
from pebr.run.checkpoint import (  # noqa: F401
    LATEST,
    STATE_FILE,
    Checkpointer,
    CheckpointError,
    find_latest,
    load_trainer_state,
)
from pebr.run.model_path import resolve_model_path  # noqa: F401
from pebr.run.rng import rng_state, set_rng_state  # noqa: F401
