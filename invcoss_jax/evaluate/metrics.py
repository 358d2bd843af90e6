"""Downstream metrics as plain functions on NumPy arrays (classification and segmentation).

Conventions follow MedCoSS's downstream code (see ../shared/notes/medcoss_facts.md):
- classification: accuracy, macro ROC AUC (one-vs-one for more than two classes, Hand & Till) and macro F1;
- segmentation: Dice (DSC) and the 95th percentile Hausdorff distance (HD95) per foreground class.

HD95 follows `medpy.metric.binary.hd95`: surfaces are the mask minus its erosion (connectivity 1, outside
of the array counts as background), directed distances are taken from every surface voxel of one mask to
the nearest surface voxel of the other (Euclidean, scaled by `spacing`), both directions are pooled and
the 95th percentile (linear interpolation) is returned. MedCoSS passes spacing (1, 1[, 1]), i.e. reports
HD95 in voxels; pass the image spacing to get millimetres.

Empty masks (MedCoSS `compute_HD95`): both empty -> 0; exactly one empty -> 500 (a fixed penalty in the
units of the result, voxels or mm alike). Dice: both empty -> 1 (MedCoSS 2D `dice_score`); MedCoSS's 3D
tasks add 1 to the denominator instead (`smooth=1`), which gives 0 when both are empty.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import scipy.ndimage as ndi
import scipy.stats

HD95_BOTH_EMPTY = 0.0
HD95_ONE_EMPTY = 500.0


def _as_1d_labels(name: str, y: np.ndarray) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise ValueError(f"{name}: expected a 1-D array of class ids, got shape {y.shape}")
  if y.size == 0:
    raise ValueError(f"{name}: empty array")
  return y.astype(np.int64)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """Fraction of correct predictions; `y_pred` are class ids."""
  y_true = _as_1d_labels("y_true", y_true)
  y_pred = _as_1d_labels("y_pred", y_pred)
  if y_true.shape != y_pred.shape:
    raise ValueError(f"accuracy: y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
  return float(np.mean(y_true == y_pred))


def _binary_auc(is_pos: np.ndarray, score: np.ndarray) -> float:
  """Mann-Whitney U statistic / (n_pos * n_neg), ties counted half (average ranks)."""
  n_pos = int(is_pos.sum())
  n_neg = is_pos.size - n_pos
  if n_pos == 0 or n_neg == 0:
    raise ValueError("roc_auc: needs at least one positive and one negative example per class pair")
  ranks = scipy.stats.rankdata(score.astype(np.float64))
  u = ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
  """Area under the ROC curve.

  Binary: `y_score` is `(N,)` (score of class 1) or `(N, 2)` (column 1 is used). Multi-class: `y_score`
  is `(N, C)` class probabilities and the result is the macro average over all class pairs of the
  one-vs-one AUC of Hand & Till (2001), as `sklearn.metrics.roc_auc_score(multi_class='ovo')`.
  Raises ValueError when a class of `y_true` has no example (AUC undefined).
  """
  y_true = _as_1d_labels("y_true", y_true)
  y_score = np.asarray(y_score, dtype=np.float64)
  if y_score.shape[0] != y_true.shape[0]:
    raise ValueError(f"roc_auc: y_score has {y_score.shape[0]} rows, y_true {y_true.shape[0]}")
  if y_score.ndim == 1 or y_score.shape[1] == 2:
    score = y_score if y_score.ndim == 1 else y_score[:, 1]
    if not set(np.unique(y_true)) <= {0, 1}:
      raise ValueError(f"roc_auc: binary scores but labels {np.unique(y_true).tolist()}")
    return _binary_auc(y_true == 1, score)
  num_classes = y_score.shape[1]
  present = np.unique(y_true)
  if present.min() < 0 or present.max() >= num_classes:
    raise ValueError(f"roc_auc: labels {present.tolist()} outside [0, {num_classes}) of y_score")
  if present.size < num_classes:
    raise ValueError(f"roc_auc: classes {sorted(set(range(num_classes)) - set(present.tolist()))} have no "
                     "example in y_true; one-vs-one AUC is undefined")
  pair_scores = []
  for a, b in itertools.combinations(range(num_classes), 2):
    sel = (y_true == a) | (y_true == b)
    auc_a = _binary_auc(y_true[sel] == a, y_score[sel, a])
    auc_b = _binary_auc(y_true[sel] == b, y_score[sel, b])
    pair_scores.append((auc_a + auc_b) / 2.0)
  return float(np.mean(pair_scores))


def f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None = None) -> float:
  """Macro F1 over classes; a class with no true and no predicted example scores 0 (sklearn's default).

  Classes averaged over: those present in `y_true` or `y_pred` (sklearn's default), or all of
  `range(num_classes)` when given.
  """
  y_true = _as_1d_labels("y_true", y_true)
  y_pred = _as_1d_labels("y_pred", y_pred)
  if y_true.shape != y_pred.shape:
    raise ValueError(f"f1: y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
  classes = np.arange(num_classes) if num_classes else np.union1d(y_true, y_pred)
  scores = []
  for c in classes:
    tp = np.sum((y_pred == c) & (y_true == c))
    denom = np.sum(y_pred == c) + np.sum(y_true == c)  # 2 tp + fp + fn
    scores.append(2.0 * tp / denom if denom > 0 else 0.0)
  return float(np.mean(scores))


def dice(pred: np.ndarray, target: np.ndarray, *, smooth: float = 0.0, both_empty: float = 1.0) -> float:
  """Dice similarity coefficient 2|P & T| / (|P| + |T| + smooth) of two binary masks.

  With `smooth == 0` two empty masks give `both_empty` (1, MedCoSS 2D); MedCoSS 3D uses `smooth=1`.
  """
  pred = np.asarray(pred).astype(bool)
  target = np.asarray(target).astype(bool)
  if pred.shape != target.shape:
    raise ValueError(f"dice: pred {pred.shape} and target {target.shape} differ in shape")
  inter = np.count_nonzero(pred & target)
  denom = np.count_nonzero(pred) + np.count_nonzero(target) + smooth
  if denom == 0:
    return float(both_empty)
  return float(2.0 * inter / denom)


def _spacing(spacing: Sequence[float] | float | None, ndim: int) -> np.ndarray:
  if spacing is None:
    return np.ones(ndim, np.float64)
  s = np.asarray(spacing, np.float64)
  if s.ndim == 0:
    s = np.full(ndim, float(s))
  if s.shape != (ndim,) or np.any(s <= 0):
    raise ValueError(f"hd95: spacing {spacing!r} must be {ndim} positive numbers (one per array axis)")
  return s


def surface(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
  """Boundary voxels of a binary mask: the mask minus its erosion (the outside counts as background)."""
  footprint = ndi.generate_binary_structure(mask.ndim, connectivity)
  return mask & ~ndi.binary_erosion(mask, structure=footprint, iterations=1, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: np.ndarray, connectivity: int = 1) -> np.ndarray:
  """Distances from every surface voxel of `a` to the nearest surface voxel of `b` (both non-empty)."""
  dist_to_b = ndi.distance_transform_edt(~surface(b, connectivity), sampling=spacing)
  return dist_to_b[surface(a, connectivity)]


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | float | None = None, *,
         connectivity: int = 1, both_empty: float = HD95_BOTH_EMPTY,
         one_empty: float = HD95_ONE_EMPTY) -> float:
  """95th percentile symmetric Hausdorff distance of two binary masks (medpy.metric.binary.hd95).

  `spacing`: voxel size per axis (mm) -> result in mm; None -> voxels (MedCoSS reports voxels).
  Empty masks: see the module docstring (0 if both empty, 500 if one is).
  """
  pred = np.asarray(pred).astype(bool)
  target = np.asarray(target).astype(bool)
  if pred.shape != target.shape:
    raise ValueError(f"hd95: pred {pred.shape} and target {target.shape} differ in shape")
  n_pred, n_target = np.count_nonzero(pred), np.count_nonzero(target)
  if n_pred == 0 and n_target == 0:
    return float(both_empty)
  if n_pred == 0 or n_target == 0:
    return float(one_empty)
  s = _spacing(spacing, pred.ndim)
  d = np.concatenate([surface_distances(pred, target, s, connectivity),
                      surface_distances(target, pred, s, connectivity)])
  return float(np.percentile(d, 95))


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """ACC, AUC and F1 (fractions) from integer labels `(N,)` and class probabilities `(N, C)`.

  AUC is NaN when a class has no example (e.g. a tiny validation split); ACC and F1 are always defined.
  """
  probs = np.asarray(probs, np.float64)
  pred = probs.argmax(axis=-1)
  try:
    auc = roc_auc(labels, probs)
  except ValueError as e:
    if "no example" not in str(e) and "at least one positive" not in str(e):
      raise
    auc = float("nan")
  return {"acc": accuracy(labels, pred), "auc": auc, "f1": f1(labels, pred, num_classes=probs.shape[-1])}


def segmentation_metrics(pred_labels: np.ndarray, true_labels: np.ndarray, num_classes: int, *,
                         spacing: Sequence[float] | None = None,
                         dice_smooth: float = 0.0) -> dict[str, float]:
  """Per-class and mean Dice and HD95 (voxels and, with `spacing`, mm) of one label map.

  Classes 1..num_classes-1 are foreground; keys: `dsc`, `hd95`, `hd95_mm` (means over foreground
  classes) and `dsc_<c>`, `hd95_<c>`, `hd95_mm_<c>` per class.
  """
  pred_labels = np.asarray(pred_labels)
  true_labels = np.asarray(true_labels)
  if pred_labels.shape != true_labels.shape:
    raise ValueError(f"segmentation_metrics: prediction {pred_labels.shape} and label map "
                     f"{true_labels.shape} differ in shape")
  out: dict[str, float] = {}
  for c in range(1, num_classes):
    p, t = pred_labels == c, true_labels == c
    out[f"dsc_{c}"] = dice(p, t, smooth=dice_smooth)
    out[f"hd95_{c}"] = hd95(p, t)
    out[f"hd95_mm_{c}"] = hd95(p, t, spacing) if spacing is not None else out[f"hd95_{c}"]
  for key in ("dsc", "hd95", "hd95_mm"):
    out[key] = float(np.mean([out[f"{key}_{c}"] for c in range(1, num_classes)]))
  return out
