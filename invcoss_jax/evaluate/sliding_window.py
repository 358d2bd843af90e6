"""Sliding-window inference with overlapping, Gaussian-weighted windows (nnU-Net / MedCoSS style).

Used for segmentation inputs larger than the training window: windows are placed with stride
ceil(window * (1 - overlap)), the last one flush with the far edge; each window's prediction is
weighted by a Gaussian importance map (sigma = window * sigma_scale, 1/8 in MedCoSS's 3D tasks) and
the weighted sum is divided by the summed weights. Inputs smaller than the window are padded at the
far end and the result cropped back.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Sequence

import numpy as np
import scipy.ndimage as ndi

PredictFn = Callable[[np.ndarray], np.ndarray]


@functools.lru_cache(maxsize=16)
def _gaussian_cached(window: tuple[int, ...], sigma_scale: float) -> np.ndarray:
  impulse = np.zeros(window, np.float64)
  impulse[tuple(w // 2 for w in window)] = 1.0
  g = ndi.gaussian_filter(impulse, [w * sigma_scale for w in window], mode="constant", cval=0.0)
  g = (g / g.max()).astype(np.float32)
  # Zero weights would divide by zero where only the window's far corner covers a voxel.
  g[g == 0] = g[g > 0].min()
  g.setflags(write=False)
  return g


def gaussian_importance(window: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
  """Importance map of shape `window`, 1 at the centre, strictly positive everywhere (float32)."""
  if sigma_scale <= 0:
    raise ValueError(f"sliding window: sigma_scale must be > 0, got {sigma_scale}")
  return _gaussian_cached(tuple(int(w) for w in window), float(sigma_scale))


def window_starts(size: int, window: int, overlap: float) -> list[int]:
  """Start offsets along one axis covering [0, size) (size >= window)."""
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"sliding window: overlap must be in [0, 1), got {overlap}")
  stride = max(1, math.ceil(window * (1.0 - overlap)))
  n = math.ceil((size - window) / stride) + 1
  return sorted({min(i * stride, size - window) for i in range(n)})


def sliding_window_inference(predict_fn: PredictFn, images: np.ndarray, window: Sequence[int], *,
                             overlap: float = 0.5, sigma_scale: float = 1.0 / 8, batch_size: int = 4,
                             pad_value: float = 0.0) -> np.ndarray:
  """Predicts `images` `(B, *spatial, C)` window by window.

  `predict_fn` maps `(batch_size, *window, C)` to `(batch_size, *window, K)` (probabilities, so that the
  weighted average is one); it is always called with exactly `batch_size` windows (the last call is
  padded with copies) so a jitted function compiles once. Returns float32 `(B, *spatial, K)`.
  """
  images = np.asarray(images)
  window = tuple(int(w) for w in window)
  spatial = images.shape[1:-1]
  if len(window) != len(spatial):
    raise ValueError(f"sliding window: window {window} has {len(window)} axes, images {images.shape} have "
                     f"{len(spatial)} spatial axes")
  pad = [max(0, w - s) for w, s in zip(window, spatial)]
  if any(pad):
    images = np.pad(images, [(0, 0)] + [(0, p) for p in pad] + [(0, 0)], constant_values=pad_value)
  full = images.shape[1:-1]
  weight = gaussian_importance(window, sigma_scale)[..., None]
  corners = list(itertools.product(*(window_starts(s, w, overlap) for s, w in zip(full, window))))
  jobs = [(b, c) for b in range(images.shape[0]) for c in corners]

  out = None
  norm = np.zeros((images.shape[0], *full, 1), np.float32)
  for i in range(0, len(jobs), batch_size):
    chunk = jobs[i:i + batch_size]
    crops = [images[(b, *(slice(c, c + w) for c, w in zip(corner, window)))] for b, corner in chunk]
    crops += [crops[-1]] * (batch_size - len(crops))
    pred = np.asarray(predict_fn(np.stack(crops)), np.float32)
    if pred.shape[:-1] != (batch_size, *window):
      raise ValueError(f"sliding window: predict_fn returned {pred.shape}, expected "
                       f"{(batch_size, *window, '...')}")
    if out is None:
      out = np.zeros((images.shape[0], *full, pred.shape[-1]), np.float32)
    for j, (b, corner) in enumerate(chunk):
      region = (b, *(slice(c, c + w) for c, w in zip(corner, window)))
      out[region] += pred[j] * weight
      norm[region] += weight
  out /= norm
  return out[(slice(None), *(slice(0, s) for s in spatial))]
