"""Whole-slide images (Aperio SVS, pyramidal TIFF) with tifffile: regions decoded tile by tile, and the
tissue tiles of a slide found on a low-resolution level (JPEG and JPEG 2000 tiles need imagecodecs)."""

from __future__ import annotations

import dataclasses
import os
import threading
import zlib

import numpy as np

from invcoss_jax.data.errors import DataError

WSI_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif")


def _tiff_errors():
  import tifffile  # pylint: disable=g-import-not-at-top
  return (OSError, EOFError, ValueError, KeyError, IndexError, RuntimeError, tifffile.TiffFileError)


class Slide:
  """One slide file. Regions are decoded from the tiles they overlap; the file handle is opened per
  process on first use (and not pickled), reads are serialised by a lock."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._lock = threading.Lock()
    self._tif = None
    with self._lock:
      tif = self._open()
      levels = tif.series[0].levels
      self.level_shapes = [tuple(int(s) for s in lv.shape[:2]) for lv in levels]
      channels = [int(lv.shape[2]) if len(lv.shape) == 3 else 1 for lv in levels]
    if channels[0] not in (3, 4):
      raise DataError(self.path, f"expected an RGB slide, got {channels[0]} channel(s) at level 0")

  def _open(self):
    import tifffile  # pylint: disable=g-import-not-at-top
    if self._tif is None:
      try:
        self._tif = tifffile.TiffFile(self.path)
        if not self._tif.series:
          raise DataError(self.path, "expected a (pyramidal) TIFF image, found no image series")
      except _tiff_errors() as e:
        raise DataError(self.path, f"cannot open the slide ({type(e).__name__}: {e}); expected a "
                        "readable SVS/TIFF whole-slide image") from e
    return self._tif

  def __getstate__(self):
    return {"path": self.path, "level_shapes": self.level_shapes}

  def __setstate__(self, state):
    self.path, self.level_shapes = state["path"], state["level_shapes"]
    self._lock, self._tif = threading.Lock(), None

  @property
  def num_levels(self) -> int:
    return len(self.level_shapes)

  def downsample(self, level: int) -> float:
    return self.level_shapes[0][1] / self.level_shapes[level][1]

  def _page(self, level: int):
    if not 0 <= level < self.num_levels:
      raise DataError(self.path, f"data.wsi.level={level}: expected a level in [0, {self.num_levels})")
    return self._open().series[0].levels[level].pages[0]

  def read_level(self, level: int) -> np.ndarray:
    """A whole level as (H, W, 3) uint8 (use a low-resolution level)."""
    with self._lock:
      page = self._page(level)
      try:
        arr = page.asarray()
      except _tiff_errors() + (zlib.error,) as e:
        raise DataError(self.path, f"cannot decode level {level} ({type(e).__name__}: {e}); "
                        "expected intact image tiles") from e
    return np.ascontiguousarray(arr[..., :3])

  def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Pixels [y, y+h) x [x, x+w) of `level` as (h, w, 3) uint8, decoding only the tiles they touch."""
    with self._lock:
      page = self._page(level)
      tiled = page.is_tiled
    H, W = self.level_shapes[level]
    if y < 0 or x < 0 or y + h > H or x + w > W:
      raise DataError(self.path, f"region y={y} x={x} h={h} w={w} lies outside level {level} ({H}x{W})")
    if not tiled:
      return self.read_level(level)[y:y + h, x:x + w]
    th, tw = page.tilelength, page.tilewidth
    across = page.chunked[1]
    out = np.zeros((h, w, 3), np.uint8)
    for ty in range(y // th, (y + h - 1) // th + 1):
      for tx in range(x // tw, (x + w - 1) // tw + 1):
        i = ty * across + tx
        with self._lock:
          fh = self._tif.filehandle
          fh.seek(page.dataoffsets[i])
          data = fh.read(page.databytecounts[i])
        try:
          seg, _, _ = page.decode(data, i, jpegtables=page.jpegtables)
        except _tiff_errors() + (zlib.error,) as e:
          raise DataError(self.path, f"cannot decode tile {i} of level {level} ({type(e).__name__}: "
                          f"{e}); expected intact image tiles") from e
        if seg is None:
          raise DataError(self.path, f"tile {i} of level {level} is missing from the file")
        seg = seg.reshape(th, tw, -1)[..., :3]
        y0, x0 = ty * th, tx * tw
        ys, ye = max(y, y0), min(y + h, y0 + th)
        xs, xe = max(x, x0), min(x + w, x0 + tw)
        out[ys - y:ye - y, xs - x:xe - x] = seg[ys - y0:ye - y0, xs - x0:xe - x0]
    return out


def tissue_mask(rgb: np.ndarray, saturation_threshold: float, brightness_threshold: float) -> np.ndarray:
  """True where a pixel is stained tissue: coloured (HSV saturation (max - min) / max above the
  threshold) and not the bright glass background (HSV value max / 255 below the threshold)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  # Elementwise max/min: a reduction over a length-3 last axis is far slower in NumPy.
  mx = np.maximum(np.maximum(r, g), b).astype(np.float32)
  mn = np.minimum(np.minimum(r, g), b).astype(np.float32)
  scale = 255.0 if rgb.dtype == np.uint8 else 1.0
  return ((mx - mn) > saturation_threshold * mx) & (mx < brightness_threshold * scale)


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """Kept tiles of a slide: top-left corners (y, x) at `level`, their tissue fractions, tile size."""
  level: int
  tile_size: int
  yx: np.ndarray  # (N, 2) int64
  tissue: np.ndarray  # (N,) float32


def tissue_tiles(slide: Slide, *, level: int, tile_size: int, tissue_threshold: float,
                 saturation_threshold: float, brightness_threshold: float) -> TileGrid:
  """Non-overlapping `tile_size` tiles of `level` whose tissue fraction is at least the threshold.

  The mask is computed on the coarsest pyramid level that still gives a tile at least 8x8 mask pixels,
  so a gigapixel slide is never decoded whole at full resolution.
  """
  if tile_size <= 0:
    raise DataError(None, f"data.wsi.tile_size={tile_size}: expected a positive tile size")
  H, W = slide.level_shapes[level]
  rows, cols = H // tile_size, W // tile_size
  if rows == 0 or cols == 0:
    raise DataError(slide.path, f"level {level} ({H}x{W}) is smaller than one tile of {tile_size} px")
  tile_l0 = tile_size * slide.downsample(level)
  mask_level = level
  for lv in range(slide.num_levels):
    if slide.downsample(lv) >= slide.downsample(mask_level) and tile_l0 / slide.downsample(lv) >= 8:
      mask_level = lv
  mask = tissue_mask(slide.read_level(mask_level), saturation_threshold, brightness_threshold)
  scale = slide.downsample(level) / slide.downsample(mask_level)  # level px -> mask px
  yx, frac = [], []
  for r in range(rows):
    for c in range(cols):
      y0, x0 = int(round(r * tile_size * scale)), int(round(c * tile_size * scale))
      y1 = max(y0 + 1, int(round((r + 1) * tile_size * scale)))
      x1 = max(x0 + 1, int(round((c + 1) * tile_size * scale)))
      f = float(mask[y0:y1, x0:x1].mean()) if mask[y0:y1, x0:x1].size else 0.0
      if f >= tissue_threshold:
        yx.append((r * tile_size, c * tile_size))
        frac.append(f)
  return TileGrid(level, tile_size, np.asarray(yx, np.int64).reshape(-1, 2), np.asarray(frac, np.float32))
