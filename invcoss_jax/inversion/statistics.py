"""Batch-wise feature statistics of a trained stage (paper App. B.2, Eq. 9).

One pass of the trained MAE over the stage's whole dataset, in evaluation mode with no masking, reads every
encoder block's output tokens `(B, 1 + L, D)` and accumulates per block the mean and the biased variance over
the batch axis, shape `(1 + L, D)` each. Mini-batches (and the shards of a batch on several devices) are
merged with the pairwise update of Eq. 9, which is exact for any batching. These statistics replace the
BatchNorm running statistics of classic model inversion (DeepInversion) as the target of L_norm.
"""

from __future__ import annotations

import functools
import math
import os
import zipfile
from typing import Any, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from invcoss_jax import data as data_lib, models, npz_io
from invcoss_jax.config_checks import fraction_count
from invcoss_jax.io_utils import atomic_savez
from invcoss_jax.measure.features import pad_batch
from invcoss_jax.parallel import mesh as mesh_lib


@flax.struct.dataclass
class FeatureStats:
  """Mean and biased variance over the batch axis of every encoder block's tokens.

  count: number of samples merged (scalar); mean, var: `(num_blocks, 1 + L, D)`, block `i` at index `i`.
  Also used for the moments of a single array (then `mean`/`var` have that array's trailing shape).
  """
  count: Any
  mean: Any
  var: Any
  # Optional input-space statistics (config.inversion.pixel_statistics), or None: {'mean', 'var'} over the
  # batch of every pixel and channel (the image shape) and 'tv', the mean total variation of an image (the
  # `l_img` 'mean' reduction). The analogue of DeepInversion's first BatchNorm layer, which sees pixels.
  pixel: Any = None

  @property
  def num_blocks(self) -> int:
    return int(self.mean.shape[0])


def batch_moments(x, axis: int = 0, weights=None, dtype=jnp.float32) -> FeatureStats:
  """Count, mean and biased variance of `x` over `axis` (two-pass, accumulated in `dtype`).

  `weights` (shape `(x.shape[axis],)`, 0 or 1) leaves padded rows out, so a ragged batch can be padded to a
  fixed shape. Works on NumPy arrays (computed in NumPy) and JAX arrays (computed in JAX).
  """
  xp = np if isinstance(x, np.ndarray) else jnp
  x = xp.moveaxis(xp.asarray(x).astype(dtype), axis, 0)
  if weights is None:
    count = xp.asarray(x.shape[0], dtype)
    mean = xp.mean(x, axis=0)
    var = xp.mean(xp.square(x - mean), axis=0)
  else:
    w = xp.asarray(weights).astype(dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    count = xp.sum(w)
    safe = xp.maximum(count, 1)
    mean = xp.sum(w * x, axis=0) / safe
    var = xp.sum(w * xp.square(x - mean), axis=0) / safe
  return FeatureStats(count=count, mean=mean, var=var)


def merge_moments(a: FeatureStats, b: FeatureStats) -> FeatureStats:
  """Eq. 9: merges the moments of two disjoint sets of samples; exact (up to rounding) for any split.

  mean = (N_a mu_a + n_b mu_b) / N,  var = (N_a var_a + n_b var_b) / N + N_a n_b / N^2 (mu_a - mu_b)^2.
  An empty side (count 0) returns the other. Accumulates in the dtype of the inputs (use float64 NumPy
  arrays on the host for long passes).
  """
  xp = np if isinstance(a.mean, np.ndarray) and isinstance(b.mean, np.ndarray) else jnp
  na, nb = xp.asarray(a.count), xp.asarray(b.count)
  n = na + nb
  safe = xp.maximum(n, 1)
  fa, fb = na / safe, nb / safe
  delta = a.mean - b.mean
  mean = fa * a.mean + fb * b.mean
  var = fa * a.var + fb * b.var + fa * fb * xp.square(delta)
  return FeatureStats(count=n, mean=mean, var=var)


def stack_block_moments(moments: list[FeatureStats]) -> FeatureStats:
  """Per-block moments (all of one count) -> one FeatureStats with a leading block axis."""
  xp = np if isinstance(moments[0].mean, np.ndarray) else jnp
  return FeatureStats(count=moments[0].count, mean=xp.stack([m.mean for m in moments]),
                      var=xp.stack([m.var for m in moments]))


def block_token_moments(block_tokens: list, weights=None) -> FeatureStats:
  """Moments over the batch axis of each block's tokens `(B, 1 + L, D)`, stacked by block (float32)."""
  return stack_block_moments([batch_moments(t, axis=0, weights=weights) for t in block_tokens])



def encoder_forward(model, params, images) -> tuple[list, jax.Array]:
  """Eval-mode encoder pass with no masking: (each block's tokens `(B, 1 + L, D)`, final tokens).

  With mask_ratio 0 and no noise the MAE keeps the tokens in raster order, so statistics are per position.
  """
  (tokens, _, _), state = model.apply({"params": params}, images, mask_ratio=0.0, train=False,
                                      method=type(model).encode, mutable=["intermediates"])
  return models.block_tokens(state["intermediates"]), tokens  # the ViT-MAE contract (DESIGN.md)


def check_statistics(stats: FeatureStats, model, params, image_shape, where: str = "statistics") -> None:
  """Raises when `stats` do not fit the block tokens `model` gives for images of `image_shape`."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  blocks, _ = jax.eval_shape(lambda p, x: encoder_forward(model, p, x), params, x)
  expected = (len(blocks), *blocks[0].shape[1:])
  if tuple(np.shape(stats.mean)) != expected or tuple(np.shape(stats.var)) != expected:
    raise ValueError(f"{where}: statistics of shape {tuple(np.shape(stats.mean))} (blocks, tokens, width) do not "
                     f"fit the model, which gives {expected} for images of shape {tuple(image_shape)}")


def _images_of(batch) -> np.ndarray:
  if isinstance(batch, Mapping):
    if "image" not in batch:
      raise ValueError(f"a statistics batch must be an image array or a dict with key 'image', got keys "
                       f"{sorted(batch)}")
    batch = batch["image"]
  x = np.asarray(batch)
  if x.ndim not in (4, 5):
    raise ValueError(f"a statistics batch must be (B, H, W, C) or (B, D, H, W, C), got shape {x.shape}")
  return x


@functools.lru_cache(maxsize=8)
def _moments_fn(model):
  """The compiled per-batch moments of `model`'s block tokens (kept: jobs compute statistics repeatedly)."""
  @jax.jit
  def moments_fn(params, images, weights):
    blocks, _ = encoder_forward(model, params, images)
    return block_token_moments([t.astype(jnp.float32) for t in blocks], weights=weights)
  return moments_fn


def image_tv(x: np.ndarray) -> np.ndarray:
  """Per-image anisotropic total variation `(B,)`: the sum over spatial axes of the mean absolute neighbour
  difference (the `losses.l_img` 'mean' reduction, image by image)."""
  x = np.asarray(x, np.float64)
  return sum(np.mean(np.abs(np.diff(x, axis=a)), axis=tuple(range(1, x.ndim))) for a in range(1, x.ndim - 1))


def pixel_moments(x: np.ndarray) -> tuple[FeatureStats, float]:
  """(moments over the batch of every pixel and channel, summed per-image TV) of one host batch (float64)."""
  m = batch_moments(np.asarray(x, np.float64), axis=0, dtype=np.float64)
  return m, float(np.sum(image_tv(x)))


def compute_statistics(model, params, batches: Iterable, *, mesh=None, pixel: bool = False) -> FeatureStats:
  """Per-block token statistics of `model` over every example of `batches` (one pass, Eq. 9 merging).

  `batches` yields image arrays or dicts with 'image' (the input layer's eval iterator; the last batch may be
  ragged). Each batch is padded to a fixed size (a multiple of the mesh's batch shards) so one compiled
  function serves every batch; the padded rows carry weight 0. With `mesh`, the batch is split over the batch
  axes and the reductions over the batch axis run across devices inside the compiled function. Per-batch
  moments are float32 two-pass; batches are merged on the host in float64. Returns float64 NumPy arrays.
  With `pixel`, the input-space statistics (`FeatureStats.pixel`) are accumulated in the same pass.
  """
  shards = mesh_lib.num_batch_shards(mesh) if mesh is not None else 1

  moments_fn = _moments_fn(model)
  if mesh is not None:
    params = jax.device_put(params, mesh_lib.replicated(mesh))
  total = None
  pix, tv_sum = None, 0.0
  padded_size = None
  for batch in batches:
    x = _images_of(batch)
    if x.shape[0] == 0:
      continue
    if pixel:
      m, tv = pixel_moments(x)
      pix, tv_sum = (m if pix is None else merge_moments(pix, m)), tv_sum + tv
    if padded_size is None or x.shape[0] > padded_size:
      padded_size = -(-x.shape[0] // shards) * shards
    x, w = pad_batch(x.astype(np.float32), padded_size)
    if mesh is not None:
      x, w = mesh_lib.put_batch(mesh, (x, w))
    m = jax.device_get(moments_fn(params, x, w))
    m = FeatureStats(count=np.float64(m.count), mean=np.asarray(m.mean, np.float64),
                     var=np.asarray(m.var, np.float64))
    total = m if total is None else merge_moments(total, m)
  if total is None:
    raise ValueError("compute_statistics: the batches were empty (no examples to compute statistics on)")
  if pixel:
    total = total.replace(pixel=dict(mean=pix.mean, var=pix.var, tv=np.float64(tv_sum / float(pix.count))))
  return total


_STATS_KEYS = ("count", "mean", "var")
_PIXEL_KEYS = ("pixel_mean", "pixel_var", "pixel_tv")


def save_statistics(path: str | os.PathLike, stats: FeatureStats) -> int:
  """Writes `stats` as one uncompressed `.npz` (mean/var float32, count int64), atomically; returns its size."""
  mean, var = np.asarray(stats.mean, np.float32), np.asarray(stats.var, np.float32)
  if mean.shape != var.shape or mean.ndim != 3:
    raise ValueError(f"statistics must have mean and var of one shape (num_blocks, 1 + L, D), got "
                     f"{mean.shape} and {var.shape}")
  extra = {}
  if stats.pixel is not None:
    extra = dict(pixel_mean=np.asarray(stats.pixel["mean"], np.float32),
                 pixel_var=np.asarray(stats.pixel["var"], np.float32),
                 pixel_tv=np.asarray(stats.pixel["tv"], np.float32))
  atomic_savez(path, count=np.asarray(stats.count, np.int64), mean=mean, var=var, **extra)
  return os.path.getsize(path)


def load_statistics(path: str | os.PathLike) -> FeatureStats:
  """Reads statistics written by `save_statistics` (float32 mean/var, int64 count), checking the layout."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"statistics file {path!r} not found: run the 'stats' job (or 'pretrain', which "
                            "ends with it) on the stage first")
  try:
    with zipfile.ZipFile(path) as zf:
      present = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    arrays = npz_io.load_npz(path, [k for k in _STATS_KEYS + _PIXEL_KEYS if k in present])
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"statistics file {path!r} is not a readable .npz: {e}") from e
  missing = [k for k in _STATS_KEYS if k not in arrays]
  if missing:
    raise ValueError(f"statistics file {path!r} lacks {missing}; expected keys {list(_STATS_KEYS)}")
  count, mean, var = (arrays[k] for k in _STATS_KEYS)
  if mean.ndim != 3 or mean.shape != var.shape or count.shape != ():
    raise ValueError(f"statistics file {path!r}: expected mean and var of shape (num_blocks, 1 + L, D) and a "
                     f"scalar count, got mean {mean.shape}, var {var.shape}, count {count.shape}")
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var >= 0) and count > 0):
    raise ValueError(f"statistics file {path!r} holds non-finite or negative values (or a count of 0)")
  pixel = None
  if all(k in arrays for k in _PIXEL_KEYS):
    pixel = {k[len("pixel_"):]: arrays[k].astype(np.float32) for k in _PIXEL_KEYS}
    if (pixel["mean"].shape != pixel["var"].shape or pixel["tv"].shape != ()
        or not all(np.all(np.isfinite(v)) for v in pixel.values()) or np.any(pixel["var"] < 0)):
      raise ValueError(f"statistics file {path!r}: its pixel statistics are malformed (expected pixel_mean and "
                       "pixel_var of the image shape, non-negative variances and a scalar pixel_tv)")
  elif any(k in arrays for k in _PIXEL_KEYS):
    raise ValueError(f"statistics file {path!r} holds only some of {list(_PIXEL_KEYS)}")
  return FeatureStats(count=count, mean=mean.astype(np.float32), var=var.astype(np.float32), pixel=pixel)


def statistics_nbytes(stats: FeatureStats) -> int:
  """Bytes the statistics take as stored (float32 mean and var, int64 count, and the float32 pixel
  statistics when kept; no compression)."""
  pixel = 0 if stats.pixel is None else 4 * sum(int(np.asarray(v).size) for v in stats.pixel.values())
  return int(2 * np.asarray(stats.mean).size * 4 + 8 + pixel)


def replay_buffer_nbytes(data_cfg, fraction: float, *, bytes_per_value: int = 4) -> int:
  """Bytes of a real replay buffer holding `fraction` of the dataset of `data_cfg` (uncompressed).

  Counts int(fraction * N) examples (at least 1) of the model input shape at `bytes_per_value` (4: float32
  preprocessed images, the layout the synthetic shards use; 1 would be 8-bit raw pixels).
  """
  n = fraction_count("replay buffer fraction", fraction, data_lib.num_examples(data_cfg))
  return int(n * math.prod(data_lib.image_shape(data_cfg)) * bytes_per_value)
