"""Metric writers and the MAE reconstruction image grid."""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from clu import metric_writers

from invcoss_jax.io_utils import atomic_path


def create_writer(workdir: str | os.PathLike) -> metric_writers.MetricWriter:
  """TensorBoard event files in `workdir` plus logging, on process 0; logging only elsewhere."""
  return metric_writers.create_default_writer(os.fspath(workdir), just_logging=jax.process_index() > 0,
                                              asynchronous=True)


def mid_slice(x: np.ndarray) -> np.ndarray:
  """(B, D, H, W, C) -> (B, H, W, C) at the middle depth; 2D batches pass through."""
  x = np.asarray(x)
  if x.ndim == 5:
    return x[:, x.shape[1] // 2]
  if x.ndim != 4:
    raise ValueError(f"expected (B,H,W,C) or (B,D,H,W,C), got shape {x.shape}")
  return x


def _to_rgb(x: np.ndarray) -> np.ndarray:
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]


def mae_image_grid(images: np.ndarray, mask_pixels: np.ndarray, reconstruction: np.ndarray,
                   pad: int = 2) -> np.ndarray:
  """One row per example: input | input with masked patches blanked | reconstruction (visible
  patches kept, masked ones predicted). 3D volumes show their middle slice. Each row is scaled to
  [0, 1] by its input's range, so CT, MRI and X-ray look alike. Returns (H', W', 3) float32."""
  x, m, r = (mid_slice(a).astype(np.float32) for a in (images, mask_pixels, reconstruction))
  lo = x.min(axis=(1, 2, 3), keepdims=True)
  hi = x.max(axis=(1, 2, 3), keepdims=True)
  scale = lambda a: np.clip((a - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)
  visible = 1.0 - (m > 0).astype(np.float32)
  panels = [scale(x), scale(x) * visible + 0.5 * (1.0 - visible), scale(r)]
  b, h, w, _ = x.shape
  grid = np.ones((b * (h + pad) + pad, len(panels) * (w + pad) + pad, 3), np.float32)
  for i in range(b):
    for j, p in enumerate(panels):
      y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
      grid[y0:y0 + h, x0:x0 + w] = _to_rgb(p[i])
  return grid


def image_grid(images: np.ndarray, max_images: int, pad: int = 2) -> np.ndarray:
  """(rows*h, cols*w, 3) uint8 grid; 3D volumes show their middle slice, each image scaled by its range."""
  x = np.asarray(images[:max_images], np.float32)
  if x.ndim == 5:
    x = x[:, x.shape[1] // 2]
  lo = x.min(axis=(1, 2, 3), keepdims=True)
  hi = x.max(axis=(1, 2, 3), keepdims=True)
  x = np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  n, h, w, _ = x.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.float32)
  for i in range(n):
    r, c = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x[i, ..., :3]
  return (grid * 255.0 + 0.5).astype(np.uint8)


def write_png(path: str, rgb: np.ndarray) -> None:
  """Writes an (h, w, 3) uint8 image as PNG, atomically."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with atomic_path(path) as tmp:
    Image.fromarray(rgb).save(tmp, format="PNG")
