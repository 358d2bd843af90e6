"""Patchify / unpatchify for 2D (B,H,W,C) and 3D (B,D,H,W,C) channels-last images.

A patch is flattened in (patch spatial dims..., channels) order, so for 2D a patch vector is
(ph, pw, C) row-major, as in the MAE reference (`p q c`).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp


def grid_shape(spatial: Sequence[int], patch_size: Sequence[int]) -> tuple[int, ...]:
  spatial, patch_size = tuple(spatial), tuple(patch_size)
  if len(spatial) != len(patch_size):
    raise ValueError(f"image spatial shape {spatial} and patch size {patch_size} differ in rank")
  for s, p in zip(spatial, patch_size):
    if s % p:
      raise ValueError(f"image spatial shape {spatial} is not divisible by the patch size {patch_size}")
  return tuple(s // p for s, p in zip(spatial, patch_size))


def patchify(images: jnp.ndarray, patch_size: Sequence[int]) -> jnp.ndarray:
  """(B, *spatial, C) -> (B, L, prod(patch_size) * C)."""
  b, *spatial, c = images.shape
  grid = grid_shape(spatial, patch_size)
  n = len(grid)
  # (B, g1, p1, g2, p2, ..., C) -> (B, g1, g2, ..., p1, p2, ..., C)
  shape = [b]
  for g, p in zip(grid, patch_size):
    shape += [g, p]
  x = images.reshape(*shape, c)
  perm = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [1 + 2 * n]
  x = x.transpose(perm)
  l = 1
  for g in grid:
    l *= g
  p = 1
  for q in patch_size:
    p *= q
  return x.reshape(b, l, p * c)


def unpatchify(patches: jnp.ndarray, grid: Sequence[int], patch_size: Sequence[int],
               channels: int) -> jnp.ndarray:
  """(B, L, prod(patch_size) * C) -> (B, *spatial, C); the inverse of `patchify`."""
  b, l, _ = patches.shape
  grid, patch_size = tuple(grid), tuple(patch_size)
  n = len(grid)
  x = patches.reshape(b, *grid, *patch_size, channels)
  # (B, g1.., p1.., C) -> (B, g1, p1, g2, p2, ..., C)
  perm = [0]
  for i in range(n):
    perm += [1 + i, 1 + n + i]
  perm.append(1 + 2 * n)
  x = x.transpose(perm)
  return x.reshape(b, *[g * p for g, p in zip(grid, patch_size)], channels)
