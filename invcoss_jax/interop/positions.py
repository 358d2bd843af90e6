"""Rules for position embeddings, the one part of a ViT whose layout differs between the three families.

- MAE / timm: one table `(1, [1 +] N, D)` with a row for the CLS token (zero in MAE's fixed sin-cos table);
  the encoder adds it before the blocks, the MAE decoder after `decoder_embed`. Our encoder gives the CLS
  token no position, so its row is folded into `cls_token` (exact: the CLS token gets nothing else); the
  decoder's CLS row goes to `decoder_cls_pos_{r}d` (or must be zero).
- MedCoSS: an `nn.Embedding` indexed by the raster index of each token, sized for the largest image
  (e.g. 1024 rows for 512 x 512 / 16); a forward pass uses the first N rows. We keep the first
  prod(`learned_pos_grid`) rows as the learned grid table, exact at that grid (other grids are interpolated
  here, while MedCoSS would read other raster rows).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np

from invcoss_jax.interop.rules import Arrays, Path, Rule
from invcoss_jax.models import pos_embed as pos_lib

SINCOS_ATOL = 1e-3  # a fixed sin-cos table saved in float16 still passes; a trained table does not


def token_grid(n_rows: int, rank: int, base_grid: Sequence[int]) -> tuple[tuple[int, ...] | None, bool]:
  """(grid, has_cls_row) of a MAE/timm table with `n_rows` rows: the configured learned grid if it fits, else a
  square 2D grid; (None, True) when neither fits."""
  base_grid = tuple(int(g) for g in base_grid)
  n_base = int(np.prod(base_grid))
  if n_rows == n_base + 1:
    return base_grid, True
  if n_rows == n_base:
    return base_grid, False
  if rank == 2:
    for n, has_cls in ((n_rows - 1, True), (n_rows, False)):
      s = math.isqrt(max(n, 0))
      if s > 0 and s * s == n:
        return (s, s), has_cls
  return None, True


def resize_table(table: np.ndarray, grid: Sequence[int]) -> np.ndarray:
  """A learned (*grid0, D) table on another grid, with the model's own interpolation (`MAE._pos`)."""
  grid = tuple(int(g) for g in grid)
  if table.shape[:-1] == grid:
    return table
  method = "bicubic" if len(grid) == 2 else "trilinear"
  return np.asarray(jax.image.resize(table, (*grid, table.shape[-1]), method=method), np.float32)


def _check_sincos(table: np.ndarray, grid: Sequence[int], what: str, learned_option: str) -> None:
  ref = pos_lib.sincos_grid(table.shape[-1], grid)
  err = float(np.max(np.abs(table.reshape(ref.shape) - ref))) if table.size == ref.size else float("inf")
  if err > SINCOS_ATOL:
    raise ValueError(f"{what} is not the fixed sin-cos embedding of a {tuple(grid)} grid (max |diff| {err:.3g}); "
                     f"a trained table needs {learned_option}")


def _with_cls_row(ck: tuple[int, ...], exp: tuple[int, ...]) -> bool:
  """A (1, N, D) table without a CLS row also fits an expected (1, 1 + N, D)."""
  ck, exp = tuple(ck), tuple(exp)
  return ck == exp or (len(ck) == 3 and ck[0] == exp[0] and ck[2] == exp[2] and ck[1] + 1 == exp[1])


def encoder_pos(cls_key: str, pos_key: str, rank: int | None, *, width: int, learned: bool,
                base_grid: Sequence[int], grid: Sequence[int] | None) -> Rule:
  """MAE/timm `cls_token` + `pos_embed` <-> our `cls_token` (+ `pos_embed_{r}d` when learned).

  `rank=None`: the model has no tokenizer of the checkpoint's dimension, so only the CLS row is used.
  `grid`: the token grid of the torch table (import: inferred from the checkpoint; export: the export grid).
  """
  paths: list[Path] = [("cls_token",)]
  if learned and rank is not None:
    paths.append((f"pos_embed_{rank}d",))
  learned_option = "config.model.pos_embed='learned'"

  def split(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = pos.reshape(-1, pos.shape[-1])
    n = int(np.prod(grid)) if grid is not None else None
    if n is None:
      raise ValueError(f"{pos_key} has {pos.shape[0]} rows, which fit no token grid: set "
                       f"config.model.learned_pos_grid_{rank}d to the checkpoint's grid")
    if pos.shape[0] == n + 1:
      return pos[0], pos[1:]
    if pos.shape[0] == n:
      return np.zeros_like(pos[0]), pos
    raise ValueError(f"{pos_key} has {pos.shape[0]} rows; the grid {tuple(grid)} needs {n} (+1 for CLS)")

  def to_flax(a: Arrays) -> list[np.ndarray]:
    cls, pos = a
    cls_row, table = split(pos)
    out = [cls + cls_row.reshape(1, 1, -1)]
    if rank is None:
      return out
    if learned:
      out.append(table.reshape(*base_grid, table.shape[-1]))
    else:
      _check_sincos(table, grid, pos_key, learned_option)
    return out

  def to_torch(f: Arrays) -> list[np.ndarray]:
    cls = f[0]
    g = tuple(grid) if grid is not None else tuple(base_grid)
    if learned and rank is not None:
      table = resize_table(np.asarray(f[1], np.float32), g).reshape(-1, width)
    else:
      table = pos_lib.sincos_grid(width, g)
    pos = np.concatenate([np.zeros((1, width), np.float32), table], axis=0)[None]
    return [cls, pos]

  return Rule((cls_key, pos_key), tuple(paths), to_flax, to_torch, compatible=_with_cls_row)


def decoder_pos(pos_key: str, rank: int, *, width: int, learned: bool, cls_pos: bool,
                base_grid: Sequence[int], grid: Sequence[int] | None) -> Rule:
  """MAE `decoder_pos_embed` / MedCoSS `decoder_pos_embed_{2D,3D}` (1, 1 + N, D) <-> our decoder table
  (when learned) and `decoder_cls_pos_{r}d` (when configured; otherwise the CLS row must be zero)."""
  paths: list[Path] = []
  if learned:
    paths.append((f"decoder_pos_embed_{rank}d",))
  if cls_pos:
    paths.append((f"decoder_cls_pos_{rank}d",))

  def to_flax(a: Arrays) -> list[np.ndarray]:
    pos = a[0].reshape(-1, a[0].shape[-1])
    if grid is None or pos.shape[0] != int(np.prod(grid)) + 1:
      raise ValueError(f"{pos_key} has {pos.shape[0]} rows, which fit no token grid with a CLS row: set "
                       f"config.model.learned_pos_grid_{rank}d to the checkpoint's grid")
    cls_row, table = pos[0], pos[1:]
    out = []
    if learned:
      out.append(table.reshape(*base_grid, width))
    else:
      _check_sincos(table, grid, pos_key, "config.model.pos_embed='learned'")
    if cls_pos:
      out.append(cls_row.reshape(1, 1, width))
    elif float(np.max(np.abs(cls_row))) > 1e-6:
      raise ValueError(f"{pos_key} has a non-zero CLS row (a trained decoder table); it needs "
                       "config.model.decoder_cls_pos=True")
    return out

  def to_torch(f: Arrays) -> list[np.ndarray]:
    g = tuple(grid) if grid is not None else tuple(base_grid)
    f = list(f)
    table = resize_table(np.asarray(f.pop(0), np.float32), g).reshape(-1, width) if learned else \
        pos_lib.sincos_grid(width, g)
    cls_row = f.pop(0).reshape(1, width) if cls_pos else np.zeros((1, width), np.float32)
    return [np.concatenate([cls_row, table], axis=0)[None]]

  return Rule((pos_key,), tuple(paths), to_flax, to_torch)


def raster_table(key: str, rank: int, *, width: int, learned: bool, base_grid: Sequence[int]) -> Rule:
  """MedCoSS `spatial_pos_embed.weight` (N_max, D), indexed by raster position <-> `pos_embed_{r}d`."""
  n = int(np.prod(base_grid))

  def to_flax(a: Arrays) -> list[np.ndarray]:
    if not learned:
      raise ValueError(f"{key} is a learned table; the model needs config.model.pos_embed='learned'")
    return [a[0][:n].reshape(*base_grid, width)]

  def to_torch(f: Arrays) -> list[np.ndarray]:
    return [np.asarray(f[0]).reshape(n, width) if learned else np.zeros((n, width), np.float32)]

  def at_least_n_rows(ck: tuple[int, ...], exp: tuple[int, ...]) -> bool:
    return len(ck) == 2 and ck[1] == exp[1] and ck[0] >= exp[0]

  return Rule((key,), ((f"pos_embed_{rank}d",),) if learned else (), to_flax, to_torch,
              compatible=at_least_n_rows, expect=f"(>= {n}, {width})")


def token_table(key: str, *, vocab_size: int, width: int) -> Rule:
  """MedCoSS `token_embed.embeddings.weight` (49411, D; Uni-Perceiver's table, indexed by the ids of the
  tokenizer the data was encoded with, Bio_ClinicalBERT's WordPiece in MedCoSS) <-> `token_embed/embedding`
  (V, D): the first V rows, exact when config.model's vocabulary is the one the checkpoint was trained with."""

  def to_flax(a: Arrays) -> list[np.ndarray]:
    return [np.asarray(a[0])[:vocab_size]]

  def at_least_v_rows(ck: tuple[int, ...], exp: tuple[int, ...]) -> bool:
    return len(ck) == 2 and ck[1] == exp[1] and ck[0] >= exp[0]

  return Rule((key,), (("token_embed", "embedding"),), to_flax, lambda f: [np.asarray(f[0])],
              compatible=at_least_v_rows, expect=f"(>= {vocab_size} rows for config.model.vocab_size, {width})")


def text_positions(pos_key: str, type_key: str, *, rows: int, width: int) -> Rule:
  """MedCoSS's learned text positions `embeddings_pos.position_embeddings.weight` (512, D) plus row 0 of
  `embeddings_token_type.weight` (2, D; every token adds it, before the LayerNorm) <-> `pos_embed_1d` (L, D):
  the constant type vector folds into every position row (the sum the model adds is unchanged). Export writes
  the positions with a zero type table."""

  def to_flax(a: Arrays) -> list[np.ndarray]:
    return [np.asarray(a[0])[:rows] + np.asarray(a[1])[0][None]]

  def to_torch(f: Arrays) -> list[np.ndarray]:
    return [np.asarray(f[0]), np.zeros((2, width), np.asarray(f[0]).dtype)]

  def compatible(ck: tuple[int, ...], exp: tuple[int, ...]) -> bool:
    return len(ck) == 2 and ck[1] == exp[1] and ck[0] >= exp[0]

  return Rule((pos_key, type_key), (("pos_embed_1d",),), to_flax, to_torch, compatible=compatible,
              expect=f"(>= {rows} rows for config.model.text_max_len, {width})")
