"""Batch-wise feature statistics of a trained stage (paper App. B.2, Eq. 9).

One pass of the trained MAE over the stage's whole dataset, in evaluation mode with no masking, reads every
encoder block's output tokens `(B, 1 + L, D)` and accumulates per block the mean and the biased variance over
the batch axis, shape `(1 + L, D)` each. Mini-batches (and the shards of a batch on several devices) are
merged with the pairwise update of Eq. 9, which is exact for any batching. These statistics replace the
BatchNorm running statistics of classic model inversion (DeepInversion) as the target of L_norm.

With config.privacy on, `compute_dp_statistics` computes them with differential privacy instead (the Gaussian
mechanism on clipped per-example sums; docs/privacy.md), into the same file layout.
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
  # With config.inversion.pixel_components = K > 0 it also holds the principal subspace of the grey images
  # (`principal_subspace`): 'pca_shape', 'pca_mean', 'pca_basis' (K, D), 'pca_var' (K,), 'pca_residual'.
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


# --- The principal subspace of the grey images (config.inversion.pixel_components) ---------------------------
# Matching per-pixel moments lets a batch put the real images' pixel variance anywhere: the inverted X-rays had
# 0.2-0.7x the real variance along the leading principal components (global brightness, the lung fields'
# contrast) and 3x the real energy outside the first 32 (independent texture), docs/results.md. The covariance
# of the grey images, kept as its K leading eigenpairs on a pooled grid, says where real images vary together.

PCA_KEYS = ("pca_shape", "pca_mean", "pca_basis", "pca_var", "pca_residual")
MAX_PCA_VALUES = 4096  # values per pooled image: the pass accumulates a (D, D) float64 covariance


def pca_pool_shape(spatial: tuple[int, ...], grid: int) -> tuple[int, ...]:
  """The pooled spatial shape: each side divided by the smallest integer factor that brings it to <= `grid`
  (a ValueError when that factor does not divide the side, or the pooled image has over MAX_PCA_VALUES values)."""
  out = []
  for side in spatial:
    f = -(-int(side) // int(grid))
    if int(side) % f:
      raise ValueError(f"config.inversion.pixel_components_grid={grid}: a side of {side} pixels is not a multiple "
                       f"of the pooling factor {f} it needs; pick a grid whose factor divides {tuple(spatial)}")
    out.append(int(side) // f)
  if math.prod(out) > MAX_PCA_VALUES:
    raise ValueError(f"config.inversion.pixel_components_grid={grid} pools {tuple(spatial)} images to "
                     f"{tuple(out)} = {math.prod(out)} values; at most {MAX_PCA_VALUES} (the statistics pass "
                     "keeps their covariance): lower the grid")
  return tuple(out)


def pooled_grey(x, pooled_shape: tuple[int, ...]):
  """(B, D) the channel mean of `x` `(B, *spatial, C)` average-pooled to `pooled_shape` (integer factors),
  flattened. NumPy in, NumPy (float64) out; JAX in, JAX out."""
  xp = np if isinstance(x, np.ndarray) else jnp
  g = xp.mean(x.astype(np.float64 if xp is np else jnp.float32), axis=-1)
  spatial = g.shape[1:]
  shape = [g.shape[0]]
  for side, p in zip(spatial, pooled_shape):
    shape += [int(p), int(side) // int(p)]
  g = g.reshape(shape).mean(axis=tuple(range(2, 2 + 2 * len(spatial), 2)))
  return g.reshape(g.shape[0], -1)


def principal_subspace(sum_x: np.ndarray, sum_xx: np.ndarray, count: float, k: int,
                       pooled_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
  """The K leading eigenpairs of the covariance of the pooled grey images from their sums (float64):
  pca_mean (D,), pca_basis (K, D) (orthonormal rows), pca_var (K,) (the eigenvalues, descending),
  pca_residual (the variance left outside them: trace minus their sum), pca_shape (the pooled shape)."""
  mean = sum_x / count
  cov = sum_xx / count - np.outer(mean, mean)
  cov = 0.5 * (cov + cov.T)
  k = int(k)
  if not 1 <= k < len(mean):
    raise ValueError(f"config.inversion.pixel_components={k}: expected 1 <= K < {len(mean)}, the values of a "
                     f"pooled image {tuple(pooled_shape)}")
  evals, evecs = np.linalg.eigh(cov)
  order = np.argsort(evals)[::-1]
  evals, evecs = np.maximum(evals[order], 0.0), evecs[:, order]
  return dict(pca_shape=np.asarray(pooled_shape, np.int64), pca_mean=mean, pca_basis=evecs[:, :k].T,
              pca_var=evals[:k], pca_residual=np.float64(max(float(np.trace(cov) - evals[:k].sum()), 0.0)))


def compute_statistics(model, params, batches: Iterable, *, mesh=None, pixel: bool = False,
                       pixel_components: int = 0, pixel_components_grid: int = 32) -> FeatureStats:
  """Per-block token statistics of `model` over every example of `batches` (one pass, Eq. 9 merging).

  `batches` yields image arrays or dicts with 'image' (the input layer's eval iterator; the last batch may be
  ragged). Each batch is padded to a fixed size (a multiple of the mesh's batch shards) so one compiled
  function serves every batch; the padded rows carry weight 0. With `mesh`, the batch is split over the batch
  axes and the reductions over the batch axis run across devices inside the compiled function. Per-batch
  moments are float32 two-pass; batches are merged on the host in float64. Returns float64 NumPy arrays.
  With `pixel`, the input-space statistics (`FeatureStats.pixel`) are accumulated in the same pass, and with
  `pixel_components` = K > 0 also the K leading principal components of the grey images pooled to at most
  `pixel_components_grid` per side (`principal_subspace`).
  """
  shards = mesh_lib.num_batch_shards(mesh) if mesh is not None else 1

  moments_fn = _moments_fn(model)
  if mesh is not None:
    params = jax.device_put(params, mesh_lib.replicated(mesh))
  total = None
  pix, tv_sum = None, 0.0
  pca_sums, pooled_shape = None, None
  padded_size = None
  for batch in batches:
    x = _images_of(batch)
    if x.shape[0] == 0:
      continue
    if pixel:
      m, tv = pixel_moments(x)
      pix, tv_sum = (m if pix is None else merge_moments(pix, m)), tv_sum + tv
      if pixel_components:
        if pooled_shape is None:
          pooled_shape = pca_pool_shape(x.shape[1:-1], pixel_components_grid)
          pca_sums = [np.zeros(math.prod(pooled_shape)), np.zeros((math.prod(pooled_shape),) * 2)]
        g = pooled_grey(np.asarray(x), pooled_shape)
        pca_sums[0] += g.sum(axis=0)
        pca_sums[1] += g.T @ g
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
    pix_stats = dict(mean=pix.mean, var=pix.var, tv=np.float64(tv_sum / float(pix.count)))
    if pixel_components:
      pix_stats.update(principal_subspace(pca_sums[0], pca_sums[1], float(pix.count), int(pixel_components),
                                          pooled_shape))
    total = total.replace(pixel=pix_stats)
  return total


# --- DP statistics ---------------------------------------------------------------------------------------

# A variance derived from noisy moments, E[x^2] - E[x]^2, can come out at or below 0 where the noise outweighs
# the spread (its noise has std about sigma C sqrt(2) / N per coordinate, whatever the variance); such a
# coordinate is clamped to this floor, so the file stays valid (non-negative, as load_statistics checks) and L_norm
# asks the synthetic set for almost no spread there. The fraction clamped is reported (statistics.json).
VARIANCE_FLOOR = 1e-6
# The statistics' noise key is fold_in(PRNGKey(config.seed), this): a rerun adds the same noise (the pass is
# reproducible) and the key is apart from every key training splits from PRNGKey(config.seed).
STATS_NOISE_STREAM = 0x57A7


def statistics_noise_key(seed: int) -> jax.Array:
  """The key of a DP statistics pass's noise, a function of the run's seed alone."""
  return jax.random.fold_in(jax.random.PRNGKey(int(seed)), STATS_NOISE_STREAM)


def _image_tv_jnp(x):
  """image_tv in JAX (float32): per image, the sum over spatial axes of the mean absolute neighbour difference."""
  return sum(jnp.mean(jnp.abs(jnp.diff(x, axis=a)), axis=tuple(range(1, x.ndim))) for a in range(1, x.ndim - 1))


@functools.lru_cache(maxsize=8)
def _clipped_sums_fn(model, pixel: bool):
  """The compiled clipped per-example sums of one padded batch: fn(params, images, weights, clip_norm) ->
  (sums, real rows, rows clipped, each row's contribution norm before clipping)."""
  def per_row(a, scale):  # sum over rows of scale * a, elementwise in float32 (no matmul, no TF32)
    return jnp.sum(scale.reshape((-1,) + (1,) * (a.ndim - 1)) * a, axis=0)

  def axes(a):
    return tuple(range(1, a.ndim))

  @jax.jit
  def fn(params, images, weights, clip_norm):
    blocks, _ = encoder_forward(model, params, images)
    blocks = [t.astype(jnp.float32) for t in blocks]
    # Each example's contribution: its tokens and their squares in every block (and its pixels, their squares
    # and its total variation), one vector whose squared L2 norm is the sum of theirs.
    sq_norm = sum(jnp.sum(jnp.square(t), axis=axes(t)) + jnp.sum(jnp.square(jnp.square(t)), axis=axes(t))
                  for t in blocks)
    if pixel:
      x = images.astype(jnp.float32)
      tv = _image_tv_jnp(x)
      sq_norm = sq_norm + jnp.sum(jnp.square(x), axis=axes(x)) + jnp.sum(jnp.square(jnp.square(x)), axis=axes(x))
      sq_norm = sq_norm + jnp.square(tv)
    norm = jnp.sqrt(sq_norm)
    w = weights.astype(jnp.float32)
    scale = w * jnp.where(norm > clip_norm, clip_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
    sums = dict(mean=jnp.stack([per_row(t, scale) for t in blocks]),
                second=jnp.stack([per_row(jnp.square(t), scale) for t in blocks]))
    if pixel:
      sums.update(pixel_mean=per_row(x, scale), pixel_second=per_row(jnp.square(x), scale),
                  pixel_tv=jnp.sum(scale * tv))
    return sums, jnp.sum(w), jnp.sum(w * (norm > clip_norm)), norm
  return fn


def _padded_batches(batches: Iterable, mesh):
  """(real rows, padded images, row weights) of every non-empty batch, padded as compute_statistics does."""
  shards = mesh_lib.num_batch_shards(mesh) if mesh is not None else 1
  padded_size = None
  for batch in batches:
    x = _images_of(batch)
    if x.shape[0] == 0:
      continue
    if padded_size is None or x.shape[0] > padded_size:
      padded_size = -(-x.shape[0] // shards) * shards
    rows = x.shape[0]
    x, w = pad_batch(x.astype(np.float32), padded_size)
    if mesh is not None:
      x, w = mesh_lib.put_batch(mesh, (x, w))
    yield rows, x, w


def clipped_sums(model, params, batches: Iterable, *, clip_norm: float, mesh=None, pixel: bool = False
                 ) -> tuple[dict[str, np.ndarray], int, int]:
  """(sums, examples, examples clipped): over every example of `batches`, the sum of its contribution (its
  block tokens `mean` and their squares `second`, `(num_blocks, 1 + L, D)` each; with `pixel` its pixels
  `pixel_mean`, their squares `pixel_second` and its total variation `pixel_tv`) scaled so that the whole
  vector has L2 norm at most `clip_norm`. Adding or removing one example moves the concatenated sums by at most
  clip_norm (their L2 sensitivity). Per batch in float32, summed over batches in float64."""
  if mesh is not None:
    params = jax.device_put(params, mesh_lib.replicated(mesh))
  fn = _clipped_sums_fn(model, bool(pixel))
  total, count, clipped = None, 0, 0
  for _, x, w in _padded_batches(batches, mesh):
    sums, n, c, _ = jax.device_get(fn(params, x, w, np.float32(clip_norm)))
    sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
    total = sums if total is None else {k: total[k] + sums[k] for k in total}
    count, clipped = count + int(n), clipped + int(c)
  if total is None:
    raise ValueError("clipped_sums: the batches were empty (no examples to compute statistics on)")
  return total, count, clipped


def contribution_norms(model, params, batches: Iterable, *, mesh=None, pixel: bool = False) -> np.ndarray:
  """The L2 norm of each example's statistics contribution before clipping (what privacy.stats_clip_norm bounds),
  for choosing the clip norm on public images (its median is a fair start; docs/privacy.md)."""
  if mesh is not None:
    params = jax.device_put(params, mesh_lib.replicated(mesh))
  fn = _clipped_sums_fn(model, bool(pixel))
  out = [np.asarray(jax.device_get(fn(params, x, w, np.float32(np.inf))[3]))[:rows]
         for rows, x, w in _padded_batches(batches, mesh)]
  return np.concatenate(out)


def add_gaussian_noise(sums: Mapping[str, Any], std: float, key) -> dict[str, np.ndarray]:
  """`sums` + N(0, std^2) on every coordinate: one Gaussian mechanism on the concatenated vector. Part `name`'s
  noise comes from fold_in(key, its index in sorted order), float32 normals of JAX's threefry drawn on the host
  CPU (the same on every backend), added in float64."""
  out = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  if std == 0:
    return out
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    key = jax.device_put(key, cpu)
    for i, name in enumerate(sorted(out)):
      z = jax.random.normal(jax.random.fold_in(key, i), out[name].shape, jnp.float32)
      out[name] = out[name] + float(std) * np.asarray(z, np.float64)
  return out


def compute_dp_statistics(model, params, batches: Iterable, *, num_examples: int, clip_norm: float,
                          noise_multiplier: float, key, mesh=None, pixel: bool = False,
                          variance_floor: float = VARIANCE_FLOOR) -> tuple[FeatureStats, dict[str, Any]]:
  """compute_statistics with differential privacy: (statistics, details).

  Each example's contribution (block tokens and their squares; with `pixel` its pixels, their squares and its
  total variation) is clipped to L2 norm `clip_norm` as one vector (`clipped_sums`), the sums get Gaussian
  noise of std noise_multiplier x clip_norm (`add_gaussian_noise` with `key`), and are divided by
  `num_examples`, N, treated as public (the dataset's size; the pass must read exactly N examples). mean =
  E[x], var = max(E[x^2] - E[x]^2, variance_floor) per block, token and channel (and pixel); tv =
  max(E[tv], 0). Float64 NumPy arrays, count N. With no noise and a clip norm above every contribution these are
  compute_statistics' (to float32 rounding: the second moment, not the two-pass variance).

  details: `dimension` (of the contribution vector), `floored_fraction` (variances clamped to the floor),
  `variance_floor`, and `clipped_fraction`, computed from the data without noise: log it, never publish it."""
  sums, count, clipped = clipped_sums(model, params, batches, clip_norm=clip_norm, mesh=mesh, pixel=pixel)
  if count != int(num_examples):
    raise ValueError(f"compute_dp_statistics: the pass read {count} examples, but N = {int(num_examples)} (the "
                     "public dataset size the noisy sums are divided by): the batches must hold the whole data set")
  noisy = add_gaussian_noise(sums, float(noise_multiplier) * float(clip_norm), key)
  n = float(num_examples)

  def moments(first, second):
    mean = first / n
    raw = second / n - np.square(mean)
    return mean, np.maximum(raw, variance_floor), int(np.sum(raw < variance_floor))

  mean, var, floored = moments(noisy["mean"], noisy["second"])
  stats = FeatureStats(count=np.float64(n), mean=mean, var=var)
  size = mean.size
  if pixel:
    pmean, pvar, pfloored = moments(noisy["pixel_mean"], noisy["pixel_second"])
    stats = stats.replace(pixel=dict(mean=pmean, var=pvar, tv=np.float64(max(float(noisy["pixel_tv"]) / n, 0.0))))
    floored, size = floored + pfloored, size + pmean.size
  details = dict(dimension=int(sum(np.size(v) for v in sums.values())), floored_fraction=floored / size,
                 variance_floor=float(variance_floor), clipped_fraction=clipped / count)
  return stats, details


_STATS_KEYS = ("count", "mean", "var")
_PIXEL_KEYS = ("pixel_mean", "pixel_var", "pixel_tv")
_PIXEL_PCA_KEYS = tuple(f"pixel_{k}" for k in PCA_KEYS)
# A DP statistics file also holds (float64 scalars) the (epsilon, delta) of the stage it belongs to (its model
# and statistics composed: what a synthetic set inverted from both carries) and the statistics' epsilon alone.
# load_statistics reads only the keys above, so inversion reads a DP file unchanged.
DP_KEYS = ("dp_epsilon", "dp_delta", "dp_statistics_epsilon")


def save_statistics(path: str | os.PathLike, stats: FeatureStats, dp: Mapping[str, float] | None = None) -> int:
  """Writes `stats` as one uncompressed `.npz` (mean/var float32, count int64), atomically; returns its size.
  `dp`: {'epsilon', 'delta', 'statistics_epsilon'} of DP statistics, stored as DP_KEYS."""
  mean, var = np.asarray(stats.mean, np.float32), np.asarray(stats.var, np.float32)
  if mean.shape != var.shape or mean.ndim != 3:
    raise ValueError(f"statistics must have mean and var of one shape (num_blocks, 1 + L, D), got "
                     f"{mean.shape} and {var.shape}")
  extra = {}
  if stats.pixel is not None:
    extra = dict(pixel_mean=np.asarray(stats.pixel["mean"], np.float32),
                 pixel_var=np.asarray(stats.pixel["var"], np.float32),
                 pixel_tv=np.asarray(stats.pixel["tv"], np.float32))
    if "pca_basis" in stats.pixel:
      extra.update({f"pixel_{k}": np.asarray(stats.pixel[k], np.int64 if k == "pca_shape" else np.float32)
                    for k in PCA_KEYS})
  if dp is not None:
    extra.update({f"dp_{k}": np.asarray(float(dp[k]), np.float64) for k in ("epsilon", "delta", "statistics_epsilon")})
  atomic_savez(path, count=np.asarray(stats.count, np.int64), mean=mean, var=var, **extra)
  return os.path.getsize(path)


def read_dp_record(path: str | os.PathLike) -> dict[str, float] | None:
  """{'epsilon', 'delta', 'statistics_epsilon'} a DP statistics file records, or None (statistics without DP)."""
  with zipfile.ZipFile(os.fspath(path)) as zf:
    present = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
  if not all(k in present for k in DP_KEYS):
    return None
  arrays = npz_io.load_npz(path, list(DP_KEYS))
  return {k[len("dp_"):]: float(arrays[k]) for k in DP_KEYS}


def load_statistics(path: str | os.PathLike) -> FeatureStats:
  """Reads statistics written by `save_statistics` (float32 mean/var, int64 count), checking the layout."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"statistics file {path!r} not found: run the 'stats' job (or 'pretrain', which "
                            "ends with it) on the stage first")
  try:
    with zipfile.ZipFile(path) as zf:
      present = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    arrays = npz_io.load_npz(path, [k for k in _STATS_KEYS + _PIXEL_KEYS + _PIXEL_PCA_KEYS if k in present])
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
    if any(k in arrays for k in _PIXEL_PCA_KEYS):
      pca = {k[len("pixel_"):]: arrays.get(k) for k in _PIXEL_PCA_KEYS}
      d = None if pca["pca_mean"] is None else pca["pca_mean"].shape
      if (any(v is None for v in pca.values()) or pca["pca_basis"].ndim != 2 or (pca["pca_basis"].shape[1],) != d
          or pca["pca_var"].shape != pca["pca_basis"].shape[:1] or pca["pca_residual"].shape != ()
          or int(np.prod(pca["pca_shape"])) != d[0] or np.any(pca["pca_var"] < 0)
          or not all(np.all(np.isfinite(v)) for v in pca.values())):
        raise ValueError(f"statistics file {path!r}: its principal subspace is malformed (expected all of "
                         f"{list(_PIXEL_PCA_KEYS)}: a (K, D) basis, K variances, a D mean and a scalar residual)")
      pixel.update({k: (v.astype(np.int64) if k == "pca_shape" else v.astype(np.float32)) for k, v in pca.items()})
  elif any(k in arrays for k in _PIXEL_KEYS):
    raise ValueError(f"statistics file {path!r} holds only some of {list(_PIXEL_KEYS)}")
  return FeatureStats(count=count, mean=mean.astype(np.float32), var=var.astype(np.float32), pixel=pixel)


def statistics_nbytes(stats: FeatureStats) -> int:
  """Bytes the statistics take as stored (float32 mean and var, int64 count, and the float32 pixel
  statistics when kept; no compression)."""
  pixel = 0 if stats.pixel is None else sum((8 if k == "pca_shape" else 4) * int(np.asarray(v).size)
                                             for k, v in stats.pixel.items())
  return int(2 * np.asarray(stats.mean).size * 4 + 8 + pixel)


def replay_buffer_nbytes(data_cfg, fraction: float, *, bytes_per_value: int = 4) -> int:
  """Bytes of a real replay buffer holding `fraction` of the dataset of `data_cfg` (uncompressed).

  Counts int(fraction * N) examples (at least 1) of the model input shape at `bytes_per_value` (4: float32
  preprocessed images, the layout the synthetic shards use; 1 would be 8-bit raw pixels).
  """
  n = fraction_count("replay buffer fraction", fraction, data_lib.num_examples(data_cfg))
  return int(n * math.prod(data_lib.image_shape(data_cfg)) * bytes_per_value)
