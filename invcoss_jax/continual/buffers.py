"""Replay buffers of real samples (er, medcoss), chosen at the end of a stage while its data is still readable.

- `random_indices`: ER, a uniformly random `fraction` of the stage.
- `kmeans_indices`: MedCoSS (main_buffer_kmean.py): k-means with int(N * cluster_fraction) clusters on the
  encoder features at mask ratio 0; from every cluster, its members nearest to its centroid, int(N * fraction //
  clusters) of them (so the buffer holds at most `fraction` of the stage).
- the features k-means runs on: one eval pass of the stage's model through `measure.features.encoder_features`.
- `gather_examples`: a second eval pass keeping only the chosen examples (the buffer is written as npz shards,
  key `images`, read back by the input layer with format='npz', preprocessed=True).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from sklearn.cluster import KMeans

from invcoss_jax.config_checks import fraction_count
from invcoss_jax.measure.features import model_inputs


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


def gather_examples(batches: Iterable, indices: Sequence[int]) -> np.ndarray:
  """The examples at `indices` (positions in the iteration order of `batches`), in that order."""
  wanted = np.asarray(sorted(set(int(i) for i in indices)))
  out, start = [], 0
  for batch in batches:
    x = model_inputs(batch)
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
