"""The PeBR-R1 recipe on the layers below: config and presets (config.py), where a run keeps its
stages (paths.py), items (items.py), dataset-level sampling and splits (splits.py), the one
builder of a stage (builder.py), the stages as pebr.train runs them (runner.py), held-out eval
(evaluate.py) and the ablation (curriculum.py)."""
