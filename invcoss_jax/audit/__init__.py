"""Privacy audit of synthetic data (docs/privacy_audit.md): pure functions on arrays, and the `audit` job
(`invcoss_jax.audit.job.run`, imported on its own: it needs the input layer and the trainer)."""

from invcoss_jax.audit.distances import (Neighbours, init_neighbours, nearest_neighbours, summarize_distances,
                                         update_neighbours)
from invcoss_jax.audit.membership import bootstrap_auc, per_sample_masked_mse, roc_auc, tpr_at_fpr
from invcoss_jax.audit.memorisation import bootstrap_memorisation, memorisation_rate, memorisation_threshold
from invcoss_jax.audit.spectrum import (high_frequency_energy_ratio, normalised_radius, power_spectrum,
                                        radial_profile)

__all__ = [
    "Neighbours", "bootstrap_auc", "bootstrap_memorisation", "high_frequency_energy_ratio", "init_neighbours",
    "memorisation_rate", "memorisation_threshold", "nearest_neighbours", "normalised_radius",
    "per_sample_masked_mse", "power_spectrum", "radial_profile", "roc_auc", "summarize_distances", "tpr_at_fpr",
    "update_neighbours",
]
