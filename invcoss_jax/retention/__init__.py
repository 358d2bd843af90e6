"""The retention benchmark (mode='retention'): gain, forgetting, drift and replay quality of continual methods.

`invcoss_jax.jobs.retention.run(config, workdir)` runs it; `metrics` holds the pure measures (probes, linear CKA, Fréchet distance,
intervals), `summary` turns measurements into figures and `report` writes them."""
