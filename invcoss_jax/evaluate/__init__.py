"""Downstream evaluation: metrics, heads, sliding-window inference, fine-tuning, reports, forgetting.

metrics.py (plain NumPy metrics), losses.py, heads.py (classifier, UNETR), sliding_window.py,
finetune.py (one task, every seed), report.py (results.json/.csv/.md, Table 1), forgetting.py
(stage x task matrix and plot), (the jobs: invcoss_jax/jobs/evaluate.py), config.py (defaults
and task presets).
"""
