"""Where a run keeps its stages: OUT/stage0 (warm-up), OUT/stage1 (perception), OUT/stage2
(reasoning), OUT/sampling (dataset-level sampling), and what a stage folder says about itself."""
from __future__ import annotations

import os

from pebr.model.sizes import REAL_IMAGE_SIZE
from pebr.recipe.config import DIFFICULTY_LEVELS, TINY_IMAGE_SIZE, TrainConfig
from pebr.run.checkpoint import find_latest, load_trainer_state


def stage_dir(cfg: TrainConfig, stage: int | None = None) -> str:
    """OUT/stage{k} of `cfg`'s run (k: cfg.stage unless given)."""
    return os.path.join(cfg.output_dir, f"stage{cfg.stage if stage is None else stage}")


def sampling_dir(output_dir: str) -> str:
    """OUT/sampling: the dataset-level sampling the stages of a run share."""
    return os.path.join(output_dir, "sampling")


def latest_policy_path(cfg: TrainConfig, stage: int) -> str | None:
    """The latest complete checkpoint of OUT/stage{stage}, or None (creates nothing)."""
    return find_latest(os.path.join(stage_dir(cfg, stage), "checkpoints"))


def trained_config(model: str) -> dict:
    """The TrainConfig (as a dict) a checkpoint folder's trainer_state.json records; {} for a folder
    without one (an HF model, an older run) or an unreadable one."""
    try:
        config = load_trainer_state(model).get("config", {})
    except (OSError, ValueError, AttributeError):  # CheckpointError is a ValueError
        return {}
    return config if isinstance(config, dict) else {}


def trained_image_size(model: str) -> int:
    """The side of the built-in tasks' images `model` was trained on (112 for a folder that does not say)."""
    config = trained_config(model)
    if isinstance(config.get("image_size"), int):
        return config["image_size"]
    return TINY_IMAGE_SIZE if config.get("model_size", "tiny") == "tiny" else REAL_IMAGE_SIZE


def trained_difficulty(model: str) -> str:
    """The built-in difficulty `model` (a checkpoint folder) was trained at, from the config its
    trainer_state.json records; "standard" for a folder without one (an HF model, an older run)."""
    level = trained_config(model).get("difficulty", "standard")
    return level if level in DIFFICULTY_LEVELS else "standard"
