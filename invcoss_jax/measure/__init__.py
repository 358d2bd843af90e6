"""What every measurement of a frozen encoder shares (docs/DESIGN.md, "Measurements"): `features` (the pooled
encoder feature, the one compiled feature function, last-batch padding, fixed-size batched evaluation) and
`evaluators` (measurements chosen by name behind one interface: `register_evaluator`, `get_evaluator`,
`Evaluator.run(params) -> dict`). continual/, inversion/, evaluate/, retention/ and audit/ all call these."""

from invcoss_jax.lazy import lazy_attributes

__all__ = ["Evaluator", "batched", "encoder_features", "evaluator_names", "feature_fn", "get_evaluator",
           "pad_batch", "pad_rows", "pooled_feature", "register_evaluator", "row_weights"]

_EXPORTS = {
    "Evaluator": "invcoss_jax.measure.evaluators",
    "evaluator_names": "invcoss_jax.measure.evaluators",
    "get_evaluator": "invcoss_jax.measure.evaluators",
    "register_evaluator": "invcoss_jax.measure.evaluators",
    "batched": "invcoss_jax.measure.features",
    "encoder_features": "invcoss_jax.measure.features",
    "feature_fn": "invcoss_jax.measure.features",
    "pad_batch": "invcoss_jax.measure.features",
    "pad_rows": "invcoss_jax.measure.features",
    "pooled_feature": "invcoss_jax.measure.features",
    "row_weights": "invcoss_jax.measure.features",
}

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _EXPORTS)
