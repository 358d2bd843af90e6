"""Feature statistics of a trained stage and data-free inversion (paper Sec. 3, App. B.2, B.3, C).

statistics.py  per-block token statistics (Eq. 9 merging), saved as `statistics.npz`
losses.py      L_norm, L_task, L_img, L_rep and the registry of objective terms (Eq. 6)
context.py     what a loss term reads: the synthetic batch and the frozen model's view of it
engine.py      `synthesize`: generator + latents optimised against the frozen model
job.py         the `stats` and `invert` jobs
"""

from invcoss_jax.inversion.engine import synthesize, synthesize_with_report
from invcoss_jax.inversion.losses import (l_img, l_norm, l_rep, l_task, mean_pairwise_cosine, objective,
                                          register_loss_term, registered_loss_terms)
from invcoss_jax.inversion.statistics import (FeatureStats, batch_moments, compute_statistics, load_statistics,
                                              merge_moments, replay_buffer_nbytes, save_statistics,
                                              statistics_nbytes)

__all__ = [
    "FeatureStats", "batch_moments", "compute_statistics", "l_img", "l_norm", "l_rep", "l_task", "load_statistics",
    "mean_pairwise_cosine", "merge_moments", "objective", "register_loss_term", "registered_loss_terms",
    "replay_buffer_nbytes", "save_statistics", "statistics_nbytes", "synthesize", "synthesize_with_report",
]
