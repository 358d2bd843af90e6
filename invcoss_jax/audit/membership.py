"""Membership inference against the pre-trained MAE from its masked-reconstruction loss.

The attack (a loss-threshold attack, Yeom et al. 2018) scores each image by minus its per-sample masked
reconstruction loss: a model that memorised its training images reconstructs them better than unseen ones.
The AUC of separating training (members) from held-out (non-members) images by that score is 0.5 when the
model leaks nothing about membership and 1 when every member reconstructs better than every non-member.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from invcoss_jax.evaluate.metrics import roc_auc


def attack_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
  """P(score of a member > score of a non-member) + 0.5 P(tie): the ROC AUC of members (class 1) against
  non-members (evaluate.metrics.roc_auc, the package's one AUC)."""
  m, n = _scores(member_scores, "member_scores"), _scores(nonmember_scores, "nonmember_scores")
  return roc_auc(np.r_[np.ones(m.size, np.int64), np.zeros(n.size, np.int64)], np.r_[m, n])


def _auc_rows(m: np.ndarray, n: np.ndarray) -> np.ndarray:
  """AUC of every row pair: m (R, M), n (R, N) -> (R,), by mid-ranks of the pooled scores."""
  ranks = stats.rankdata(np.concatenate([m, n], axis=1), axis=1)
  nm, nn = m.shape[1], n.shape[1]
  return (ranks[:, :nm].sum(axis=1) - nm * (nm + 1) / 2.0) / (nm * nn)


def bootstrap_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray, *, num_bootstrap: int = 1000,
                  level: float = 0.95, seed: int = 0, rows_per_block: int = 100) -> dict:
  """The AUC with a percentile bootstrap interval: members and non-members are resampled separately (with
  replacement, keeping both group sizes), `num_bootstrap` times. Returns dict(auc, ci, std, level,
  num_bootstrap, num_members, num_nonmembers)."""
  m, n = _scores(member_scores, "member_scores"), _scores(nonmember_scores, "nonmember_scores")
  if num_bootstrap < 1:
    raise ValueError(f"config.audit.num_bootstrap must be >= 1, got {num_bootstrap}")
  if not 0.0 < level < 1.0:
    raise ValueError(f"config.audit.ci_level must be in (0, 1), got {level}")
  rng = np.random.default_rng(seed)
  aucs = []
  for start in range(0, num_bootstrap, rows_per_block):
    rows = min(rows_per_block, num_bootstrap - start)
    aucs.append(_auc_rows(m[rng.integers(0, m.size, (rows, m.size))], n[rng.integers(0, n.size, (rows, n.size))]))
  aucs = np.concatenate(aucs)
  lo, hi = np.quantile(aucs, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return dict(auc=attack_auc(m, n), ci=[float(lo), float(hi)], std=float(aucs.std(ddof=1)) if aucs.size > 1 else 0.0,
              level=float(level), num_bootstrap=int(num_bootstrap), num_members=int(m.size),
              num_nonmembers=int(n.size))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> float:
  """The attack's true-positive rate at a false-positive rate of at most `fpr`: the largest fraction of
  members flagged by a threshold `score >= t` that flags at most `fpr` of the non-members (Carlini et al.
  2022 report this low-FPR regime, where a few confidently exposed patients matter)."""
  m, n = _scores(member_scores, "member_scores"), _scores(nonmember_scores, "nonmember_scores")
  if not 0.0 <= fpr <= 1.0:
    raise ValueError(f"config.audit.tpr_at_fpr values must be in [0, 1], got {fpr}")
  # Candidate thresholds: every distinct score, plus +inf (flag nothing).
  thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([m, n]))[::-1]])
  n_sorted, m_sorted = np.sort(n), np.sort(m)
  fprs = (n.size - np.searchsorted(n_sorted, thresholds, side="left")) / n.size
  tprs = (m.size - np.searchsorted(m_sorted, thresholds, side="left")) / m.size
  return float(tprs[fprs <= fpr + 1e-12].max())


def _scores(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64).reshape(-1)
  if x.size == 0:
    raise ValueError(f"{name} is empty: the membership-inference AUC needs members and non-members")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(x)))} non-finite scores (non-finite losses?)")
  return x
