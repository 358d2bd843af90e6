"""Nearest-neighbour search between two sets of vectors, chunked so memory stays bounded.

The queries (e.g. the synthetic set) sit in memory; the references (e.g. the training split) may be streamed
in chunks: `update_neighbours` folds one reference chunk into a running `Neighbours` state, so a reference
set of any size costs one chunk at a time. Distances are Euclidean on the flattened samples.

On an accelerator the squared distances come from `|q|^2 + |r|^2 - 2 q.r` (one matmul per chunk, at
HIGHEST precision so TF32 does not round it). That expansion loses precision for near-duplicates, so the
`num_candidates` closest references by expansion are re-scored by the exact `|q - r|` before the minimum
is taken: a copy of a reference gets distance 0, not a rounding residue.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Neighbours(NamedTuple):
  """The nearest reference of every query seen so far: distance (Q,) float32 (inf before any reference)
  and index (Q,) int64 into the reference set (-1 before any reference)."""
  distance: np.ndarray
  index: np.ndarray


def init_neighbours(num_queries: int) -> Neighbours:
  return Neighbours(distance=np.full((num_queries,), np.inf, np.float32),
                    index=np.full((num_queries,), -1, np.int64))


def flatten_samples(x, name: str = "samples"):
  """(N, ...) -> (N, prod(...)) float32; images, volumes and feature vectors alike. A jax.Array stays on its
  device (queries kept there are not copied again for every reference chunk); anything else becomes NumPy."""
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"{name} must have a leading sample axis and at least one feature axis, got shape "
                     f"{x.shape}")
  x = x.reshape(x.shape[0], -1)
  return x.astype(jnp.float32) if isinstance(x, jax.Array) else x.astype(np.float32, copy=False)


@functools.partial(jax.jit, static_argnames=("num_candidates",))
def _chunk_nearest(queries: jax.Array, refs: jax.Array, ref_valid: jax.Array,
                   num_candidates: int) -> tuple[jax.Array, jax.Array]:
  """(best exact distance (Q,), best index in the chunk (Q,)) of `queries` (Q, F) against `refs` (R, F)."""
  q2 = jnp.sum(jnp.square(queries), axis=1)
  r2 = jnp.sum(jnp.square(refs), axis=1)
  cross = jnp.matmul(queries, refs.T, precision=jax.lax.Precision.HIGHEST)
  d2 = q2[:, None] + r2[None, :] - 2.0 * cross
  d2 = jnp.where(ref_valid[None, :], d2, jnp.inf)
  _, cand = jax.lax.top_k(-d2, num_candidates)  # (Q, k) candidate indices
  # Exact distances, one candidate at a time so no (Q, k, F) array is formed.
  exact = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(queries - refs[cand[:, c]]), axis=-1))
                     for c in range(num_candidates)], axis=1)
  exact = jnp.where(jnp.take(ref_valid, cand), exact, jnp.inf)
  j = jnp.argmin(exact, axis=1)
  return jnp.take_along_axis(exact, j[:, None], axis=1)[:, 0], jnp.take_along_axis(cand, j[:, None], axis=1)[:, 0]


def _pad_rows(x, rows: int) -> jax.Array:
  """x (NumPy or on device) padded with zero rows to `rows`, as a device array."""
  if x.shape[0] == rows:
    return jnp.asarray(x)
  if isinstance(x, jax.Array):
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))
  return jnp.asarray(np.pad(x, ((0, rows - x.shape[0]), (0, 0))))


def block_rows(requested: int, num_features: int, max_block_elements: int, available: int | None = None) -> int:
  """Rows of a chunk: `requested`, fewer when `rows * num_features` would exceed `max_block_elements`, and
  no more than the power of two at or above `available` rows (so a small or ragged set is padded to one of
  a few sizes: few compilations, little waste)."""
  rows = max(1, min(int(requested), int(max_block_elements) // max(1, int(num_features))))
  if available is not None:
    rows = min(rows, 1 << max(0, int(available) - 1).bit_length())
  return rows


def update_neighbours(state: Neighbours, queries, refs, *, ref_offset: int,
                      query_chunk: int = 256, ref_chunk: int = 1024, num_candidates: int = 4,
                      max_block_elements: int = 2**24) -> Neighbours:
  """Folds the references `refs` (global indices `ref_offset ...`) into the running nearest neighbours.

  `queries` (Q, ...) and `refs` (R, ...) are flattened per sample; they must have the same number of
  features. Pass queries as a jax.Array to keep them on the device across calls. Work is split into (query_chunk x ref_chunk) blocks padded to fixed sizes, so one compiled
  function serves every block; each block holds at most `max_block_elements` query or reference values
  (64 MiB of float32 by default), whatever the sample size. Ties keep the earlier reference.
  """
  q = flatten_samples(queries, "queries")
  r = flatten_samples(refs, "references")
  if q.shape[0] != state.distance.shape[0]:
    raise ValueError(f"{q.shape[0]} queries but the neighbour state holds {state.distance.shape[0]}")
  if r.shape[1] != q.shape[1]:
    raise ValueError(f"queries have {q.shape[1]} features per sample but references have {r.shape[1]}: "
                     f"both sets must have the same sample shape")
  if query_chunk < 1 or ref_chunk < 1:
    raise ValueError(f"query_chunk and ref_chunk must be >= 1, got {query_chunk} and {ref_chunk}")
  distance, index = state.distance.copy(), state.index.copy()
  if r.shape[0] == 0 or q.shape[0] == 0:
    return Neighbours(distance, index)
  qc = block_rows(query_chunk, q.shape[1], max_block_elements, q.shape[0])
  rc = block_rows(ref_chunk, r.shape[1], max_block_elements, r.shape[0])
  k = min(num_candidates, rc)
  r_blocks = []
  for r0 in range(0, r.shape[0], rc):
    r_blk = r[r0:r0 + rc]
    r_blocks.append((r0, _pad_rows(r_blk, rc), jnp.asarray(np.arange(rc) < r_blk.shape[0])))
  # Running minima stay on the device (dispatch is asynchronous); one transfer at the end.
  per_query_block = []
  for q0 in range(0, q.shape[0], qc):
    q_dev = _pad_rows(q[q0:q0 + qc], qc)
    best_d, best_j = None, None
    for r0, r_dev, valid in r_blocks:
      d, j = _chunk_nearest(q_dev, r_dev, valid, k)
      j = j + r0
      if best_d is None:
        best_d, best_j = d, j
      else:  # strict: ties keep the earlier reference
        better = d < best_d
        best_d, best_j = jnp.where(better, d, best_d), jnp.where(better, j, best_j)
    per_query_block.append((q0, best_d, best_j))
  for q0, d, j in jax.device_get(per_query_block):
    n = min(qc, q.shape[0] - q0)
    d, j = np.asarray(d[:n], np.float32), np.asarray(j[:n], np.int64)
    better = d < distance[q0:q0 + n]
    distance[q0:q0 + n] = np.where(better, d, distance[q0:q0 + n])
    index[q0:q0 + n] = np.where(better, j + ref_offset, index[q0:q0 + n])
  return Neighbours(distance, index)


def nearest_neighbours(queries, refs, **chunking) -> Neighbours:
  """The nearest reference of every query (Euclidean on flattened samples): `Neighbours(distance, index)`."""
  q = flatten_samples(queries, "queries")
  return update_neighbours(init_neighbours(q.shape[0]), q, refs, ref_offset=0, **chunking)


def summarize_distances(d: np.ndarray) -> dict[str, float]:
  """Count, mean and quantiles of a distance sample (float64 for the report)."""
  d = np.asarray(d, np.float64)
  if d.size == 0:
    return dict(count=0)
  q = np.quantile(d, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
  return dict(count=int(d.size), mean=float(d.mean()), min=float(q[0]), p05=float(q[1]), p25=float(q[2]),
              median=float(q[3]), p75=float(q[4]), p95=float(q[5]), max=float(q[6]))
