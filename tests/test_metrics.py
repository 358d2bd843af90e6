"""Downstream metrics against scikit-learn and a brute-force NumPy/SciPy HD95."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.spatial.distance
import sklearn.metrics

from invcoss_jax.evaluate import metrics


def _random_probs(rng, n, c, ties=False):
  logits = rng.normal(size=(n, c))
  if ties:  # coarse scores create many ties, which the rank statistic must count half
    logits = np.round(logits * 2) / 2
  p = np.exp(logits)
  return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_f1_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 4, size=97)
  pred = np.where(rng.random(97) < 0.6, y, rng.integers(0, 4, size=97))
  assert metrics.accuracy(y, pred) == pytest.approx(sklearn.metrics.accuracy_score(y, pred))
  assert metrics.f1(y, pred) == pytest.approx(sklearn.metrics.f1_score(y, pred, average="macro"))
  # A class never predicted and never true still counts (as 0) when num_classes names it.
  ref = sklearn.metrics.f1_score(y, pred, average="macro", labels=range(6), zero_division=0)
  assert metrics.f1(y, pred, num_classes=6) == pytest.approx(ref)
  assert metrics.accuracy(y[:, None], pred) == metrics.accuracy(y, pred)  # (N, 1) labels as in MedMNIST


@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_binary_and_ovo_match_sklearn(ties):
  rng = np.random.default_rng(3)
  y2 = rng.integers(0, 2, size=80)
  s2 = _random_probs(rng, 80, 2, ties) + 0.3 * np.eye(2)[y2]
  assert metrics.roc_auc(y2, s2) == pytest.approx(sklearn.metrics.roc_auc_score(y2, s2[:, 1]))
  assert metrics.roc_auc(y2, s2[:, 1]) == pytest.approx(sklearn.metrics.roc_auc_score(y2, s2[:, 1]))
  for c in (3, 5):
    y = rng.integers(0, c, size=120)
    p = _random_probs(rng, 120, c, ties) + 0.5 * np.eye(c)[y]
    p /= p.sum(axis=1, keepdims=True)
    ref = sklearn.metrics.roc_auc_score(y, p, multi_class="ovo", average="macro")
    assert metrics.roc_auc(y, p) == pytest.approx(ref, abs=1e-12)
    # one-vs-one differs from one-vs-rest: make sure the right one is computed.
    ovr = sklearn.metrics.roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert abs(ref - ovr) > 1e-6


def test_roc_auc_errors_and_classification_metrics():
  with pytest.raises(ValueError, match="no example"):
    metrics.roc_auc(np.array([0, 0, 1]), np.full((3, 3), 1 / 3))
  with pytest.raises(ValueError, match="at least one positive"):
    metrics.roc_auc(np.array([1, 1]), np.array([0.2, 0.4]))
  out = metrics.classification_metrics(np.array([0, 0, 1]), np.array([[.9, .1, 0], [.2, .8, 0], [.3, .7, 0]]))
  assert np.isnan(out["auc"]) and out["acc"] == pytest.approx(2 / 3)


def test_dice_matches_f1_of_flattened_masks_and_conventions():
  rng = np.random.default_rng(4)
  p, t = rng.random((2, 17, 13)) < 0.3
  assert metrics.dice(p, t) == pytest.approx(sklearn.metrics.f1_score(t.ravel(), p.ravel()))
  inter = np.sum(p & t)
  assert metrics.dice(p, t, smooth=1.0) == pytest.approx(2 * inter / (p.sum() + t.sum() + 1))
  empty = np.zeros((4, 4), bool)
  assert metrics.dice(empty, empty) == 1.0
  assert metrics.dice(empty, empty, smooth=1.0) == 0.0
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.dice(p, t[:-1])


def _brute_surface(mask):
  """Voxels of the mask with at least one face neighbour outside it (or outside the array)."""
  padded = np.pad(mask, 1, constant_values=False)
  inner = tuple(slice(1, -1) for _ in range(mask.ndim))
  border = np.zeros_like(mask)
  for ax in range(mask.ndim):
    for shift in (-1, 1):
      border |= ~np.roll(padded, shift, axis=ax)[inner]
  return mask & border


def _brute_hd95(a, b, spacing):
  pa = np.argwhere(_brute_surface(a)) * np.asarray(spacing)
  pb = np.argwhere(_brute_surface(b)) * np.asarray(spacing)
  d = scipy.spatial.distance.cdist(pa, pb)
  return np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95)


def _blobs(rng, shape, threshold):
  return ndi.gaussian_filter(rng.normal(size=shape), 1.5) > threshold


@pytest.mark.parametrize("shape,spacing", [((24, 20), (0.7, 1.3)), ((10, 12, 9), (2.5, 0.8, 1.1))])
def test_hd95_matches_brute_force(shape, spacing):
  rng = np.random.default_rng(5)
  for trial in range(4):
    if trial < 2:
      a, b = _blobs(rng, shape, 0.05), _blobs(rng, shape, 0.1)
    else:  # salt-and-pepper masks: many isolated voxels, every voxel a surface voxel
      a, b = rng.random(shape) < 0.2, rng.random(shape) < 0.25
    ref_mm = _brute_hd95(a, b, spacing)
    ref_vox = _brute_hd95(a, b, (1.0,) * len(shape))
    assert metrics.hd95(a, b, spacing) == pytest.approx(ref_mm, rel=1e-9)
    assert metrics.hd95(a, b) == pytest.approx(ref_vox, rel=1e-9)
    assert metrics.hd95(b, a, spacing) == pytest.approx(ref_mm, rel=1e-9)  # symmetric
  assert ref_mm != pytest.approx(ref_vox)  # the spacing matters for these masks


def test_hd95_known_values_and_empty_conventions():
  a = np.zeros((8, 8), bool)
  b = np.zeros((8, 8), bool)
  a[0, 0] = True
  b[3, 4] = True
  assert metrics.hd95(a, b) == pytest.approx(5.0)
  assert metrics.hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(np.hypot(6.0, 4.0))
  assert metrics.hd95(a, a) == 0.0
  empty = np.zeros_like(a)
  assert metrics.hd95(empty, empty) == 0.0
  assert metrics.hd95(a, empty) == 500.0 and metrics.hd95(empty, a, spacing=(3.0, 3.0)) == 500.0
  with pytest.raises(ValueError, match="spacing"):
    metrics.hd95(a, b, spacing=(1.0, 1.0, 1.0))


def test_segmentation_metrics_per_class():
  rng = np.random.default_rng(6)
  true = rng.integers(0, 3, size=(9, 10, 11))
  pred = np.where(rng.random(true.shape) < 0.8, true, 0)
  out = metrics.segmentation_metrics(pred, true, 3, spacing=(1.0, 2.0, 1.0))
  for c in (1, 2):
    assert out[f"dsc_{c}"] == pytest.approx(metrics.dice(pred == c, true == c))
    assert out[f"hd95_mm_{c}"] == pytest.approx(_brute_hd95(pred == c, true == c, (1.0, 2.0, 1.0)))
  assert out["dsc"] == pytest.approx((out["dsc_1"] + out["dsc_2"]) / 2)
  assert out["hd95"] == pytest.approx((out["hd95_1"] + out["hd95_2"]) / 2)
