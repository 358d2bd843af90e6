"""Fixed sin-cos position embeddings for 1D, 2D and 3D token grids (any grid size)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """MAE's 1D sin-cos embedding: (M,) positions -> (M, dim); dim must be even."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def axis_dims(dim: int, rank: int) -> list[int]:
  """Splits `dim` over `rank` grid axes in even parts (the first axis takes the remainder)."""
  if rank == 1:
    return [dim]
  per = 2 * (dim // (2 * rank))
  first = dim - per * (rank - 1)
  if per == 0 or first % 2:
    raise ValueError(f"width {dim} cannot be split into {rank} even sin-cos parts")
  return [first] + [per] * (rank - 1)


def sincos_grid(dim: int, grid: Sequence[int]) -> np.ndarray:
  """(prod(grid), dim) float32 embedding of a raster-ordered token grid.

  The parts are taken from the last grid axis first, so for 2D this equals MAE's `get_2d_sincos_pos_embed`
  exactly (first half from the column index, second half from the row index) and PyTorch MAE checkpoints
  carry over unchanged.
  """
  grid = tuple(int(g) for g in grid)
  coords = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")
  parts = [sincos_1d(d, c) for d, c in zip(axis_dims(dim, len(grid)), coords[::-1])]
  return np.concatenate(parts, axis=1).astype(np.float32)
