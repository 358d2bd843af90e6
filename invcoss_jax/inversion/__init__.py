"""Feature statistics of a trained stage and data-free inversion (paper Sec. 3, App. B.2, B.3, C).

config.py      defaults of config.inversion and its frozen spec (`inversion_spec`: program and host options)
statistics.py  per-block token statistics (Eq. 9 merging), saved as `statistics.npz`
losses.py      L_norm, L_task, L_img, L_rep and the registry of objective terms (Eq. 6)
context.py     what a loss term reads: the synthetic batch and the frozen model's view of it
engine.py      `synthesize`: generator + latents optimised against the frozen model
stage.py       a trained stage's statistics and synthetic set, written into a workdir (the `stats` and
               `invert` jobs, invcoss_jax/jobs/inversion.py, and continual stage ends call it)
"""

from invcoss_jax.lazy import lazy_attributes

__all__ = [
    "FeatureStats", "batch_moments", "compute_statistics", "l_img", "l_norm", "l_rep", "l_task", "load_statistics",
    "mean_pairwise_cosine", "merge_moments", "objective", "register_loss_term", "registered_loss_terms",
    "replay_buffer_nbytes", "save_statistics", "statistics_nbytes", "synthesize", "synthesize_with_report",
]

_EXPORTS = {
    "FeatureStats": "invcoss_jax.inversion.statistics",
    "batch_moments": "invcoss_jax.inversion.statistics",
    "compute_statistics": "invcoss_jax.inversion.statistics",
    "l_img": "invcoss_jax.inversion.losses",
    "l_norm": "invcoss_jax.inversion.losses",
    "l_rep": "invcoss_jax.inversion.losses",
    "l_task": "invcoss_jax.inversion.losses",
    "load_statistics": "invcoss_jax.inversion.statistics",
    "mean_pairwise_cosine": "invcoss_jax.inversion.losses",
    "merge_moments": "invcoss_jax.inversion.statistics",
    "objective": "invcoss_jax.inversion.losses",
    "register_loss_term": "invcoss_jax.inversion.losses",
    "registered_loss_terms": "invcoss_jax.inversion.losses",
    "replay_buffer_nbytes": "invcoss_jax.inversion.statistics",
    "save_statistics": "invcoss_jax.inversion.statistics",
    "statistics_nbytes": "invcoss_jax.inversion.statistics",
    "synthesize": "invcoss_jax.inversion.engine",
    "synthesize_with_report": "invcoss_jax.inversion.engine",
}

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _EXPORTS)
