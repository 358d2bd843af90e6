"""Privacy audit of synthetic data (docs/privacy_audit.md): pure functions on arrays
(the `audit` job, invcoss_jax/jobs/audit.py, is imported on its own: it needs the input layer and the trainer)."""

__all__ = [
    "attack_auc",
    "Neighbours", "bootstrap_auc", "bootstrap_memorisation", "high_frequency_energy_ratio", "init_neighbours",
    "memorisation_rate", "memorisation_threshold", "nearest_neighbours", "normalised_radius",
    "power_spectrum", "radial_profile", "summarize_distances", "tpr_at_fpr",
    "update_neighbours",
]

# Imported on first use (PEP 562), so that reading a config section (defaults.base_config) does not import
# jax, flax or grain through this package.
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


def __getattr__(name: str):
  import importlib  # pylint: disable=g-import-not-at-top
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  else:
    try:
      value = importlib.import_module(f"{__name__}.{name}")  # a submodule, e.g. `data.text_io`
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{name}":
        raise
      raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
