"""Privacy audit of synthetic data (docs/privacy_audit.md): pure functions on arrays
(the `audit` job, invcoss_jax/jobs/audit.py, is imported on its own: it needs the input layer and the trainer)."""

from invcoss_jax.lazy import lazy_attributes

__all__ = [
    "attack_auc",
    "Neighbours", "bootstrap_auc", "bootstrap_memorisation", "high_frequency_energy_ratio", "init_neighbours",
    "memorisation_rate", "memorisation_threshold", "nearest_neighbours", "normalised_radius",
    "power_spectrum", "radial_profile", "summarize_distances", "tpr_at_fpr",
    "update_neighbours",
]

_EXPORTS = {
    "Neighbours": "invcoss_jax.audit.distances",
    "attack_auc": "invcoss_jax.audit.membership",
    "bootstrap_auc": "invcoss_jax.audit.membership",
    "bootstrap_memorisation": "invcoss_jax.audit.memorisation",
    "high_frequency_energy_ratio": "invcoss_jax.audit.spectrum",
    "init_neighbours": "invcoss_jax.audit.distances",
    "memorisation_rate": "invcoss_jax.audit.memorisation",
    "memorisation_threshold": "invcoss_jax.audit.memorisation",
    "nearest_neighbours": "invcoss_jax.audit.distances",
    "normalised_radius": "invcoss_jax.audit.spectrum",
    "power_spectrum": "invcoss_jax.audit.spectrum",
    "radial_profile": "invcoss_jax.audit.spectrum",
    "summarize_distances": "invcoss_jax.audit.distances",
    "tpr_at_fpr": "invcoss_jax.audit.membership",
    "update_neighbours": "invcoss_jax.audit.distances",
}

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _EXPORTS)
