"""Differential privacy of a training stage (docs/privacy.md): DP-SGD on the trainer core (per-example
clipping and Gaussian noise, jax-privacy), Poisson-sampled batches, the accountant (dp-accounting) and the
stage's ledger `privacy.json`.

config.py: `config.privacy` (imports no jax); accounting.py: the DP-SGD plan of a stage (sigma calibrated from
a target epsilon), the plan of its DP feature statistics (composed with it in one accountant) and its ledger; dp_sgd.py: the private gradient `train.core.make_step` uses; sampling.py:
Poisson-sampled, padded batches of a data section.
"""
