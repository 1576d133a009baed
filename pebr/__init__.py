"""PeBR-R1 on PeBR Engine: dataset-level sampling, perception GRPO, reasoning GRPO."""
