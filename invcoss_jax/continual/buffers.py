"""Replay buffers of real samples (er, medcoss), chosen at the end of a stage while its data is still readable.

- `random_indices`: ER, a uniformly random `fraction` of the stage.
- `kmeans_indices`: MedCoSS (main_buffer_kmean.py): k-means with int(N * cluster_fraction) clusters on the
  encoder features at mask ratio 0; from every cluster, its members nearest to its centroid, int(N * fraction //
  clusters) of them (so the buffer holds at most `fraction` of the stage).
- `encoder_features`: the features k-means runs on, one eval pass of the stage's model.
- `gather_examples`: a second eval pass keeping only the chosen examples (the buffer is written as npz shards,
  key `images`, read back by the input layer with format='npz', preprocessed=True).
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans

from invcoss_jax.config_checks import fraction_count


def buffer_size(num_examples: int, fraction: float) -> int:
  """int(fraction * N), at least 1 (`config_checks.fraction_count`, which the audit and inversion use too)."""
  if num_examples < 1:
    raise ValueError(f"a buffer needs a stage with examples, got {num_examples}")
  return fraction_count("config.continual.buffer_fraction", fraction, num_examples)


def random_indices(num_examples: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of a uniformly random buffer of `buffer_size(N, fraction)` examples."""
  n = buffer_size(num_examples, fraction)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_examples, size=n, replace=False))


def kmeans_plan(num_examples: int, cluster_fraction: float, fraction: float) -> tuple[int, int]:
  """(clusters, samples per cluster) as MedCoSS computes them, each at least 1."""
  if not 0.0 < cluster_fraction <= 1.0:
    raise ValueError(f"config.continual.kmeans.cluster_fraction must be in (0, 1], got {cluster_fraction}")
  buffer_size(num_examples, fraction)  # validates
  clusters = max(1, int(num_examples * cluster_fraction))
  per_cluster = max(1, int(num_examples * fraction // clusters))
  return clusters, per_cluster


def kmeans_indices(features: np.ndarray, *, cluster_fraction: float, fraction: float, seed: int,
                   n_init: int = 1, max_iter: int = 300) -> tuple[np.ndarray, KMeans]:
  """Sorted indices of the MedCoSS buffer of `features` (N, F) and the fitted KMeans.

  Per cluster, its members sorted by Euclidean distance to their own centroid, the first `per_cluster`.
  """
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or not np.all(np.isfinite(x)):
    raise ValueError(f"k-means buffer: features must be a finite (N, F) array, got shape {x.shape}")
  clusters, per_cluster = kmeans_plan(x.shape[0], cluster_fraction, fraction)
  km = KMeans(n_clusters=clusters, n_init=n_init, max_iter=max_iter, random_state=seed).fit(x)
  dist = np.linalg.norm(x - km.cluster_centers_[km.labels_], axis=1)
  chosen = []
  for c in range(clusters):
    members = np.flatnonzero(km.labels_ == c)
    order = np.argsort(dist[members], kind="stable")
    chosen.append(members[order[:per_cluster]])
  return np.sort(np.concatenate(chosen)), km


def pooled_feature(tokens: jax.Array, kind: str, valid: jax.Array | None = None) -> jax.Array:
  """The buffer feature of each example from the encoder output (B, 1 + L, D).

  'all_tokens': the mean over every token, CLS included (MedCoSS: feature.mean(1)); 'mean': the patch tokens
  only; 'cls': the CLS token. `valid` (B, 1 + L), for text: only its tokens (CLS and the real tokens, no
  padding) enter the means."""
  t = tokens.astype(jnp.float32)
  if kind not in ("all_tokens", "mean", "cls"):
    raise ValueError(f"config.continual.kmeans.feature must be 'all_tokens', 'mean' or 'cls', got {kind!r}")
  if kind == "cls":
    return t[:, 0]
  if kind == "mean":
    t = t[:, 1:]
    valid = None if valid is None else valid[:, 1:]
  if valid is None:
    return jnp.mean(t, axis=1)
  w = valid.astype(jnp.float32)
  return jnp.einsum("bl,bld->bd", w, t) / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)


def _inputs(batch) -> np.ndarray:
  """The model input of a batch: images (float32), or the token ids (int32) of a text batch."""
  if isinstance(batch, dict) and "tokens" in batch:
    return np.asarray(batch["tokens"], np.int32)
  x = batch["image"] if isinstance(batch, dict) else batch
  x = np.asarray(x)
  return x.astype(np.int32) if np.issubdtype(x.dtype, np.integer) and x.ndim == 2 else x.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _feature_fn(model, kind: str):
  """One compiled feature function per (model, feature), shared by every call (stages, seeds, image sets)."""

  @jax.jit
  def feats(params, x):
    tokens, _, _ = model.apply({"params": params}, x, mask_ratio=0.0, train=False, method=type(model).encode)
    valid = None
    if jnp.issubdtype(x.dtype, jnp.integer):  # text: padding (config.model.pad_id) is not part of the feature
      real = (x != model.cfg.pad_id).astype(jnp.float32)
      valid = jnp.concatenate([jnp.ones((x.shape[0], 1), jnp.float32), real], axis=1)
    return pooled_feature(tokens, kind, valid)

  return feats


def encoder_features(model, params, batches: Iterable, *, kind: str) -> np.ndarray:
  """(N, D) float32 features of every example of `batches` (images, or text batches with 'tokens'; eval
  mode, no masking), in order.

  Ragged batches are padded to the first batch's size so one compiled function serves every batch."""
  feats = _feature_fn(model, kind)
  out, size = [], None
  for batch in batches:
    x = _inputs(batch)
    n = x.shape[0]
    if n == 0:
      continue
    size = size or n
    if n < size:
      x = np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)])
    out.append(np.asarray(jax.device_get(feats(params, x)))[:n])
  if not out:
    raise ValueError("buffer features: the stage's data yielded no examples")
  return np.concatenate(out).astype(np.float32)


def gather_examples(batches: Iterable, indices: Sequence[int]) -> np.ndarray:
  """The examples at `indices` (positions in the iteration order of `batches`), in that order."""
  wanted = np.asarray(sorted(set(int(i) for i in indices)))
  out, start = [], 0
  for batch in batches:
    x = _inputs(batch)
    lo, hi = np.searchsorted(wanted, [start, start + x.shape[0]])
    if hi > lo:
      out.append(x[wanted[lo:hi] - start])
    start += x.shape[0]
    if start > wanted[-1]:
      break
  found = sum(len(o) for o in out)
  if found != len(wanted):
    raise ValueError(f"buffer: {len(wanted)} examples were chosen but the stage's data yielded only "
                     f"{start} examples (found {found})")
  return np.concatenate(out).astype(np.float32)
