"""Running and saving, whatever is trained: checkpoints (checkpoint.py, model_path.py, rng.py),
distributed set-up (distributed.py, fsdp.py), one run per folder (lock.py), logging
(log_setup.py), metrics files (metrics_log.py), the machine (machine.py), flags (cli.py)."""
