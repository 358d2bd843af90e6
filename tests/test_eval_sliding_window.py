"""Sliding-window inference: equals direct inference when the window covers the input (a real UNETR on
a real image), and for any translation-equivariant pointwise model whatever the tiling; window layout
and Gaussian weights as nnU-Net/MedCoSS."""

import itertools
import math

import jax
import numpy as np
import pytest
import scipy.ndimage as ndi

from invcoss_jax import data as data_lib
from invcoss_jax.evaluate import finetune, sliding_window
from invcoss_jax.evaluate.config import task_config
from invcoss_jax.models.presets import model_config


def _pointwise(x):
  """A nonlinear per-voxel map: any tiling of it must reproduce the direct result exactly."""
  return np.stack([np.tanh(x.sum(-1)), 1.0 / (1.0 + np.exp(-2 * x[..., 0]))], axis=-1)


class CountingPredict:
  def __init__(self, fn):
    self.fn, self.calls, self.batch_sizes = fn, 0, set()

  def __call__(self, x):
    self.calls += 1
    self.batch_sizes.add(x.shape[0])
    return self.fn(x)


@pytest.mark.parametrize("shape,window", [((2, 37, 29, 3), (16, 12)), ((1, 11, 20, 17, 1), (8, 8, 8)),
                                          ((2, 5, 7, 2), (8, 8))])
def test_pointwise_model_equals_direct_whatever_the_tiling(shape, window):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  fn = CountingPredict(_pointwise)
  got = sliding_window.sliding_window_inference(fn, x, window, overlap=0.5, batch_size=3)
  np.testing.assert_allclose(got, _pointwise(x), rtol=1e-5, atol=1e-6)
  assert fn.batch_sizes == {3}  # constant batch: a jitted predict compiles once
  padded = [max(s, w) for s, w in zip(shape[1:-1], window)]
  n_windows = math.prod(math.ceil((s - w) / math.ceil(w / 2)) + 1 for s, w in zip(padded, window))
  assert fn.calls == math.ceil(shape[0] * n_windows / 3)


def test_overlapping_windows_are_gaussian_averages():
  """A model whose output depends on the window position: the result is the Gaussian-weighted mean of
  the overlapping windows' predictions, as a brute-force accumulation computes it."""
  x = np.zeros((1, 20, 1), np.float32)
  counter = iter(range(100))

  def predict(batch):  # window i predicts the constant i
    return np.stack([np.full((12, 1), next(counter), np.float32) for _ in batch])

  got = sliding_window.sliding_window_inference(predict, x, (12,), overlap=0.5, batch_size=1)
  starts = sliding_window.window_starts(20, 12, 0.5)
  assert starts == [0, 6, 8]
  g = sliding_window.gaussian_importance((12,))
  num, den = np.zeros(20), np.zeros(20)
  for i, s in enumerate(starts):
    num[s:s + 12] += i * g
    den[s:s + 12] += g
  np.testing.assert_allclose(got[0, :, 0], num / den, rtol=1e-6)


def test_window_starts_and_gaussian():
  for size, window, overlap in itertools.product((8, 9, 31, 64), (8, 5), (0.0, 0.25, 0.5, 0.75)):
    starts = sliding_window.window_starts(size, window, overlap)
    covered = np.zeros(size, bool)
    for s in starts:
      covered[s:s + window] = True
    assert covered.all() and starts[0] == 0 and starts[-1] == size - window
    assert all(b - a <= math.ceil(window * (1 - overlap)) for a, b in zip(starts, starts[1:]))
  g = sliding_window.gaussian_importance((9, 12), 1 / 8)
  assert g.dtype == np.float32 and g.max() == g[4, 6] == 1.0 and g.min() > 0
  np.testing.assert_allclose(g, g[::-1, :], rtol=1e-6)  # symmetric about the centre along odd axes
  # nnU-Net's map: a unit impulse at the centre blurred with sigma = window / 8, scaled to max 1.
  ref = ndi.gaussian_filter(np.pad(np.ones((1, 1)), ((4, 4), (6, 5))), (9 / 8, 12 / 8), mode="constant")
  ref = ref / ref.max()
  ref[ref == 0] = ref[ref > 0].min()
  np.testing.assert_allclose(g, ref, rtol=1e-5)
  with pytest.raises(ValueError, match="overlap"):
    sliding_window.window_starts(10, 4, 1.0)


def test_unetr_window_covering_the_input_equals_direct_inference():
  t = task_config("hippocampus")
  t.unetr_feature_size, t.seg_loss = 4, "dice_ce"
  images = next(data_lib.make_eval_iterator(_xray_data(), batch_size=2, split="val"))["image"]
  m = model_config("micro")
  m.width, m.depth, m.num_heads = 32, 2, 2
  m.patch_size_2d = (8, 8)
  model = finetune.build_model(t, m, "finetune", images.shape[1:])
  params = jax.jit(lambda r: model.init(r, images.shape[1:]))(jax.random.PRNGKey(0))
  predict = jax.jit(finetune.make_predict(model, t))
  direct = np.asarray(predict(params, images))
  via_window = sliding_window.sliding_window_inference(lambda x: predict(params, x), images, images.shape[1:-1],
                                                       batch_size=2)
  np.testing.assert_allclose(via_window, direct, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(direct.sum(-1), 1.0, atol=1e-5)  # softmax probabilities


def _xray_data():
  d = task_config("pneumonia").data
  d.image_size = 32
  return d
