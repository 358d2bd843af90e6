"""Pure metrics of the retention benchmark: frozen-feature probes, representation drift, replay quality,
and the seed statistics the report is made of.

- `probe_scores`: logistic regression (standardised features) and cosine kNN, fitted on one labelled split
  and scored on a held-out one (scikit-learn).
- `linear_cka`: linear centred kernel alignment of two feature matrices of the same examples
  (Kornblith et al. 2019, Eq. 5): 1 for features equal up to rotation and isotropic scaling.
- `relative_feature_distance`: mean over examples of ||x_i - y_i|| / ||y_i||, the drift of each example's
  feature from a reference model's (0 for the same model; not invariant to rotation and scale, unlike CKA).
- `frechet_distance`: the Fréchet distance of two Gaussians fitted to two feature sets (Heusel et al.
  2017, the FID formula), here in the frozen stage encoder's feature space.
- `mean_ci`: mean and the half-width of its 95 % Student-t confidence interval over seeds.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import scipy.linalg
import scipy.stats


def _check_features(name: str, x: np.ndarray, min_rows: int = 1) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < min_rows:
    raise ValueError(f"{name}: expected an (N >= {min_rows}, D) feature matrix, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: the features hold NaN or Inf")
  return x


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
  """Linear CKA of features `x` (N, P) and `y` (N, Q) of the same N examples, in [0, 1]."""
  x = _check_features("linear_cka x", x, 2)
  y = _check_features("linear_cka y", y, 2)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"linear_cka: x has {x.shape[0]} examples and y {y.shape[0]}; expected the same examples")
  x = x - x.mean(0)
  y = y - y.mean(0)
  cross = np.linalg.norm(y.T @ x, "fro") ** 2
  norm = np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")
  if norm == 0.0:
    raise ValueError("linear_cka: one feature matrix is constant over the examples")
  return float(cross / norm)


def relative_feature_distance(x: np.ndarray, reference: np.ndarray) -> float:
  """Mean over the N examples of ||x_i - reference_i||_2 / ||reference_i||_2 (features (N, D) of the same
  examples by two models)."""
  x = _check_features("relative_feature_distance x", x)
  reference = _check_features("relative_feature_distance reference", reference)
  if x.shape != reference.shape:
    raise ValueError(f"relative_feature_distance: shapes {x.shape} and {reference.shape} differ; expected the "
                     "features of the same examples")
  norm = np.linalg.norm(reference, axis=1)
  return float(np.mean(np.linalg.norm(x - reference, axis=1) / np.maximum(norm, 1e-12)))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
  """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) of the Gaussians fitted to `x` and `y` (N, D)."""
  x = _check_features("frechet_distance x", x, 2)
  y = _check_features("frechet_distance y", y, 2)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"frechet_distance: feature sizes differ ({x.shape[1]} vs {y.shape[1]})")
  mu_x, mu_y = x.mean(0), y.mean(0)
  s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean, _ = scipy.linalg.sqrtm(s_x @ s_y, disp=False)
  if not np.all(np.isfinite(covmean)):  # singular product: regularise as pytorch-fid does
    eps = 1e-6 * np.eye(x.shape[1])
    covmean = scipy.linalg.sqrtm((s_x + eps) @ (s_y + eps))
  covmean = np.real(covmean)
  d = float(np.sum((mu_x - mu_y) ** 2) + np.trace(s_x) + np.trace(s_y) - 2.0 * np.trace(covmean))
  return max(d, 0.0)  # rounding can take the distance of a set to itself a hair below zero


def mean_pairwise_cosine(x: np.ndarray) -> float:
  """Mean cosine similarity over all distinct pairs of rows (1 = every feature points the same way)."""
  x = _check_features("mean_pairwise_cosine", x, 2)
  u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  g = u @ u.T
  n = x.shape[0]
  return float((g.sum() - np.trace(g)) / (n * (n - 1)))


def _auc(labels: np.ndarray, probs: np.ndarray, classes: np.ndarray) -> float:
  from sklearn.metrics import roc_auc_score
  present = np.unique(labels)
  if len(present) < 2:
    return float("nan")
  if probs.shape[1] == 2:
    return float(roc_auc_score(labels, probs[:, 1]))
  return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=classes))


def probe_scores(fit_x: np.ndarray, fit_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 logreg_c: float = 1.0, knn_k: int = 20, max_iter: int = 5000, seed: int = 0
                 ) -> dict[str, float]:
  """ACC and AUC of a logistic-regression probe and of a cosine kNN classifier on frozen features.

  The logistic regression sees standardised features (statistics of the fit split) with L2 penalty 1/C and
  runs L-BFGS to convergence; kNN votes among the `knn_k` fit examples of highest cosine similarity, each
  vote weighted by 1 (its AUC uses the vote fractions)."""
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from sklearn.neighbors import KNeighborsClassifier
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  import warnings

  fit_x = _check_features("probe fit features", fit_x, 2)
  test_x = _check_features("probe test features", test_x, 1)
  fit_y, test_y = np.asarray(fit_y).reshape(-1), np.asarray(test_y).reshape(-1)
  if len(fit_y) != len(fit_x) or len(test_y) != len(test_x):
    raise ValueError(f"probe: {len(fit_x)}/{len(test_x)} feature rows but {len(fit_y)}/{len(test_y)} labels")
  classes = np.unique(fit_y)
  if len(classes) < 2:
    raise ValueError(f"probe: the fit split has a single class {classes.tolist()}; expected at least two")
  out: dict[str, float] = {}
  logreg = make_pipeline(StandardScaler(), LogisticRegression(C=float(logreg_c), max_iter=int(max_iter),
                                                              random_state=int(seed)))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", ConvergenceWarning)
    logreg.fit(fit_x, fit_y)
  out["logreg_converged"] = float(not any(issubclass(w.category, ConvergenceWarning) for w in caught))
  p = logreg.predict_proba(test_x)
  out["logreg_acc"] = float(np.mean(logreg.classes_[np.argmax(p, 1)] == test_y))
  out["logreg_auc"] = _auc(test_y, p, logreg.classes_)
  k = min(int(knn_k), len(fit_x))
  knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(fit_x, fit_y)
  p = knn.predict_proba(test_x)
  out["knn_acc"] = float(np.mean(knn.classes_[np.argmax(p, 1)] == test_y))
  out["knn_auc"] = _auc(test_y, p, knn.classes_)
  return out


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
  """mean, std (ddof 1), n and the half-width `ci` of the Student-t interval of the mean (nan for n < 2)."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  n = int(v.size)
  if n == 0:
    return dict(mean=float("nan"), std=float("nan"), ci=float("nan"), n=0)
  mean = float(v.mean())
  if n < 2:
    return dict(mean=mean, std=float("nan"), ci=float("nan"), n=n)
  std = float(v.std(ddof=1))
  half = float(scipy.stats.t.ppf(0.5 + level / 2.0, n - 1) * std / math.sqrt(n))
  return dict(mean=mean, std=std, ci=half, n=n)


def significant(stat: dict[str, float]) -> bool:
  """Whether a `mean_ci` interval excludes zero."""
  return bool(stat["n"] >= 2 and np.isfinite(stat["ci"]) and abs(stat["mean"]) > stat["ci"])
