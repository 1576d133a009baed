"""`pebr.stages` before the recipe layer moved into packages: its names, from their new homes."""
from pebr.recipe.builder import make_reward_fn  # noqa: F401
from pebr.recipe.items import SFT_SEED, fit_context, load_items  # noqa: F401
from pebr.recipe.paths import latest_policy_path, stage_dir  # noqa: F401
from pebr.recipe.runner import (  # noqa: F401
    grpo_summary,
    resolve_init_model,
    run,
    run_grpo,
    run_sft,
    warmup_config,
)
from pebr.recipe.splits import SAMPLING_SETTINGS, ensure_sampling, select_split  # noqa: F401
