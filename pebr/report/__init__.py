"""Numbers and pictures of results: statistics (stats.py), eval tables and paired tests
(eval_tables.py), a run's metrics plot (metrics_plot.py), the ablation's report (curriculum_report.py)."""
