"""Training: one loop (base.py) under the warm-up SFT (sft.py) and GRPO (grpo.py); the optimizer
(optim.py). A trainer is built by pebr.recipe.builder and reads its settings from TrainConfig."""
