"""Random-access data sources (grain's `RandomAccessDataSource` protocol: `len` and `[i]`).

Each returns raw records: `image` in file units and layout, plus `label` (class), `mask` (label map),
and for volumes `spacing` and the window `start`; texts come as token ids (`TextSource`). Modality
preprocessing happens in `transforms`. Sources are cheap to pickle (they hold paths and indices;
decoded data and tokenizers are loaded per process).
Under `lenient=True` a record that cannot be read is logged once and returned as None (grain drops it).
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Sequence

import numpy as np

from invcoss_jax.data import image_io, tokenization, volume_io
from invcoss_jax.data.catalog import Case
from invcoss_jax.data.errors import DataError, SkipLog, logger
from invcoss_jax.data.text_io import TextRecord
from invcoss_jax.data.transforms import VolumeGeometry, target_grid_shape, window_starts
from invcoss_jax.data.wsi import Slide, TileGrid


class LruCache:
  """A small thread-safe least-recently-used cache, emptied when pickled."""

  def __init__(self, size: int):
    self.size = int(size)
    self._lock = threading.Lock()
    self._data: collections.OrderedDict = collections.OrderedDict()

  def get(self, key, load: Callable[[], Any]):
    with self._lock:
      if key in self._data:
        self._data.move_to_end(key)
        return self._data[key]
    value = load()
    if self.size > 0:
      with self._lock:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.size:
          self._data.popitem(last=False)
    return value

  def __getstate__(self):
    return {"size": self.size}

  def __setstate__(self, state):
    self.__init__(state["size"])


def remap_mask(mask: np.ndarray, values: Sequence[int], path: str, binarize: bool = False) -> np.ndarray:
  """Label-map values -> their index in `values` (so arbitrary label ids become 0..K-1), or with
  `binarize` foreground (> 0) -> 1."""
  mask = np.asarray(mask)
  if binarize:
    return (mask > 0).astype(np.int32)
  if not values:
    return mask.astype(np.int32)
  values = np.asarray(values, np.int64)
  order = np.argsort(values)
  pos = np.searchsorted(values[order], mask)
  pos = np.clip(pos, 0, len(values) - 1)
  found = values[order][pos] == mask
  if not np.all(found):
    bad = np.unique(mask[~found])[:10]
    raise DataError(path, f"label map holds values {bad.tolist()} not in data.mask_values")
  return order[pos].astype(np.int32)


def check_finite(array: np.ndarray, path: str, policy: str, unit: str = "voxel") -> np.ndarray:
  """Non-finite values (`unit`: voxel or pixel): `error` raises naming the file and the count; `zero`
  replaces them by 0 after a warning naming the file."""
  if np.issubdtype(array.dtype, np.floating):
    bad = ~np.isfinite(array)
    n = int(bad.sum())
    if n:
      if policy == "zero":
        logger.warning("%s: %d NaN/Inf %s(s) replaced by 0 (data.nonfinite='zero')", path, n, unit)
        array = np.where(bad, 0, array).astype(array.dtype)
      else:
        raise DataError(path, f"{n} NaN/Inf {unit}(s) of {array.size}: expected finite intensities "
                        "(set data.nonfinite='zero' to replace them, or data.lenient=True to skip the file)")
  return array


class _Base:
  """Shared lenient handling: `_guard(path, fn)` returns fn() or None after logging a skip."""

  has_labels = False
  has_masks = False

  def __init__(self, skips: SkipLog, lenient: bool):
    self.skips = skips
    self.lenient = lenient

  def _guard(self, path: str, fn: Callable[[], Any]):
    if self.lenient and self.skips.is_skipped(path):
      return None
    try:
      return fn()
    except DataError as e:
      if not self.lenient:
        raise
      self.skips.skip(path, e.problem)
      return None


class NpzSource(_Base):
  """Rows of arrays in .npz files: MedMNIST (`{split}_images`, `{split}_labels`) or shards with
  `images` (and optional `labels`), e.g. the synthetic buffer written by inversion.

  Non-finite pixels are found per file when its array is loaded and reported per row as it is read
  (`nonfinite='error'`: a DataError naming "file:key[row]"; lenient skips that row only) or replaced by 0
  once per file (`'zero'`). An unreadable file is skipped whole.
  """

  def __init__(self, parts: Sequence[tuple[str, str, str | None]], rows: Sequence[tuple[int, int]],
               *, skips: SkipLog, lenient: bool = False, cache_size: int = 4, nonfinite: str = "error"):
    """parts: (file, image key, label key or None); rows: (part index, row) of every example."""
    super().__init__(skips, lenient)
    self.parts = list(parts)
    self.rows = np.asarray(rows, np.int64).reshape(-1, 2)
    self.has_labels = bool(self.parts) and all(p[2] is not None for p in self.parts)
    self.nonfinite = nonfinite
    self._cache = LruCache(max(cache_size, 1))

  def __len__(self) -> int:
    return len(self.rows)

  def _load(self, path: str, key: str, images: bool) -> tuple[np.ndarray, dict[int, int]]:
    """(array, {row: its non-finite pixel count}) of one array; with nonfinite='zero' the pixels are
    replaced (labels are checked per row as read: a NaN class has no replacement)."""
    arr = image_io.load_npz_array(path, key)
    if not images or not np.issubdtype(arr.dtype, np.floating) or arr.ndim == 0:
      return arr, {}
    bad = ~np.isfinite(arr)
    per_row = bad.reshape(len(arr), -1).sum(axis=1)
    rows = {int(r): int(per_row[r]) for r in np.flatnonzero(per_row)}
    if rows and self.nonfinite == "zero":
      logger.warning("%s: %d NaN/Inf pixel(s) in %d row(s) of %r replaced by 0 (data.nonfinite='zero')", path,
                     int(per_row.sum()), len(rows), key)
      return np.where(bad, 0, arr).astype(arr.dtype), {}
    return arr, rows

  def _array(self, part: int, key: str, images: bool) -> tuple[np.ndarray, dict[int, int]]:
    path = self.parts[part][0]
    return self._cache.get((part, key), lambda: self._load(path, key, images))

  def __getitem__(self, i: int):
    part, row = (int(v) for v in self.rows[i])
    path, image_key, label_key = self.parts[part]
    if self.lenient and self.skips.is_skipped(path):
      return None
    try:
      images, bad = self._array(part, image_key, True)
      where = f"{path}:{image_key}[{row}]"
      if row in bad:
        raise DataError(where, f"{bad[row]} NaN/Inf pixel(s) of {images[row].size}: expected finite "
                        "intensities (set data.nonfinite='zero' to replace them, or data.lenient=True to skip "
                        "the row)")
      rec = {"image": images[row]}
      if self.has_labels:
        labels, _ = self._array(part, label_key, False)
        lab = np.asarray(labels[row])
        if not np.all(np.isfinite(lab)):
          raise DataError(f"{path}:{label_key}[{row}]", f"label {lab.tolist()}: expected a finite class id")
        rec["label"] = lab.reshape(()) if lab.size == 1 else lab
      return rec
    except DataError as e:
      if not self.lenient:
        raise
      # A bad row skips itself (its "file:key[row]"); a file that cannot be read skips all its rows.
      self.skips.skip(e.path or path, e.problem)
      return None


class ImageFolderSource(_Base):
  """2D image files, with an optional class label (sub-folder) and label-map file per image."""

  def __init__(self, cases: Sequence[Case], *, skips: SkipLog, lenient: bool = False,
               mask_values: Sequence[int] = (), mask_binarize: bool = False, nonfinite: str = "error",
               min_size: int = 0):
    super().__init__(skips, lenient)
    self.cases = list(cases)
    self.mask_values = tuple(int(v) for v in mask_values)
    self.mask_binarize = bool(mask_binarize)
    self.nonfinite = nonfinite
    self.min_size = int(min_size)
    self.has_labels = bool(self.cases) and all(c.label is not None for c in self.cases)
    self.has_masks = bool(self.cases) and all(c.label_path is not None for c in self.cases)

  def __len__(self) -> int:
    return len(self.cases)

  def __getitem__(self, i: int):
    case = self.cases[i]

    def read():
      image = image_io.read_image(case.path)
      image_io.check_image_size(image.shape, case.path, self.min_size)
      rec = {"image": check_finite(image, case.path, self.nonfinite, "pixel")}  # float TIFFs
      if self.has_labels:
        rec["label"] = np.int32(case.label)
      if self.has_masks:
        mask = image_io.read_image(case.label_path)
        if mask.ndim == 3:
          mask = mask[..., 0]
        if mask.shape != rec["image"].shape[:2]:
          raise DataError(case.label_path, f"label map of shape {mask.shape}: expected the image's "
                          f"{rec['image'].shape[:2]} ({case.path})")
        rec["mask"] = remap_mask(mask, self.mask_values, case.label_path, self.mask_binarize)
      return rec

    return self._guard(case.path, read)


class DicomSliceSource(_Base):
  """Single DICOM slices as 2D images in modality units (CT: Hounsfield units)."""

  def __init__(self, cases: Sequence[Case], *, skips: SkipLog, lenient: bool = False,
               nonfinite: str = "error", min_size: int = 0):
    super().__init__(skips, lenient)
    self.cases = list(cases)
    self.nonfinite = nonfinite
    self.min_size = int(min_size)
    self.has_labels = bool(self.cases) and all(c.label is not None for c in self.cases)

  def __len__(self) -> int:
    return len(self.cases)

  def __getitem__(self, i: int):
    case = self.cases[i]

    def read():
      image, spacing = volume_io.read_dicom_slice(case.path)
      image_io.check_image_size(image.shape, case.path, self.min_size, "a slice")
      rec = {"image": check_finite(image, case.path, self.nonfinite, "pixel"),
             "spacing": np.asarray(spacing, np.float32)}
      if self.has_labels:
        rec["label"] = np.int32(case.label)
      return rec

    return self._guard(case.path, read)


class VolumeSource(_Base):
  """Depth windows (or whole volumes) of NIfTI files or DICOM series folders, with label maps.

  The index is built from headers: every case contributes the windows of its (slab of) depth on the
  target grid. A case shorter than one window, a 4D file or a label map whose shape differs from its
  image is an error naming the file (lenient: skipped). Decoded volumes are cached per process.
  """

  def __init__(self, cases: Sequence[Case], *, reader: str, geometry: VolumeGeometry, skips: SkipLog,
               lenient: bool = False, cache_size: int = 2, mask_values: Sequence[int] = (),
               mask_binarize: bool = False, nonfinite: str = "error",
               slab: Callable[[int], tuple[int, int]] | None = None):
    super().__init__(skips, lenient)
    self.mask_binarize = bool(mask_binarize)
    if reader not in ("nifti", "dicom"):
      raise ValueError(f"reader {reader!r}: expected 'nifti' or 'dicom'")
    self.reader = reader
    self.geometry = geometry
    self.mask_values = tuple(int(v) for v in mask_values)
    self.nonfinite = nonfinite
    self._cache = LruCache(cache_size)
    self.cases: list[Case] = []
    self.headers: list[volume_io.VolumeHeader] = []
    self.slabs: list[tuple[int, int]] = []
    index = []
    for case in cases:
      try:
        header = self._header(case.path)
        if case.label_path is not None:
          lab = volume_io.nifti_header(case.label_path)
          if lab.shape != header.shape:
            raise DataError(case.label_path, f"label map of shape {lab.shape}: expected the shape "
                            f"{header.shape} of its image {case.path}")
        z0, z1 = slab(header.shape[0]) if slab else (0, header.shape[0])
        depth = target_grid_shape((z1 - z0,) + header.shape[1:], header.spacing,
                                  geometry.target_spacing)[0]
        starts = window_starts(depth, geometry)
        if not starts:
          raise DataError(case.path, f"volume of {z1 - z0} slices at {header.spacing[0]:g} mm "
                          f"({depth} slices on the target grid{', after trimming' if geometry.trim_fraction else ''}) "
                          f"is smaller than the window of {geometry.window_depth} slices")
      except DataError as e:
        if not lenient:
          raise
        skips.skip(e.path or case.path, e.problem)
        continue
      k = len(self.cases)
      self.cases.append(case)
      self.headers.append(header)
      self.slabs.append((z0, z1))
      index.extend((k, s) for s in starts)
    self.index = np.asarray(index, np.int64).reshape(-1, 2)
    self.has_masks = bool(self.cases) and all(c.label_path is not None for c in self.cases)
    self.has_labels = bool(self.cases) and all(c.label is not None for c in self.cases)

  def _header(self, path: str) -> volume_io.VolumeHeader:
    if self.reader == "nifti":
      return volume_io.nifti_header(path)
    return volume_io.dicom_series_header(path)[0]

  def __len__(self) -> int:
    return len(self.index)

  def read_case(self, k: int) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """(volume (D, H, W) float32 in file units, label map int32 or None, spacing) of case k's slab."""

    def load():
      case = self.cases[k]
      if self.reader == "nifti":
        vol, spacing = volume_io.read_nifti(case.path)
      else:
        vol, spacing = volume_io.read_dicom_series(case.path)
      vol = check_finite(vol, case.path, self.nonfinite)
      mask = None
      if case.label_path is not None:
        raw, _ = volume_io.read_nifti(case.label_path, dtype=np.float64)
        if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
          raise DataError(case.label_path, "expected an integer label map")
        mask = remap_mask(raw.astype(np.int64), self.mask_values, case.label_path, self.mask_binarize)
      z0, z1 = self.slabs[k]
      if (z0, z1) != (0, vol.shape[0]):
        vol = vol[z0:z1]
        mask = None if mask is None else mask[z0:z1]
      return vol, mask, spacing

    return self._cache.get(k, load)

  def __getitem__(self, i: int):
    k, start = (int(v) for v in self.index[i])

    def read():
      vol, mask, spacing = self.read_case(k)
      rec = {"image": vol, "spacing": np.asarray(spacing, np.float32), "start": np.int32(start)}
      if self.has_labels:
        rec["label"] = np.int32(self.cases[k].label)
      if mask is not None:
        rec["mask"] = mask
      return rec

    return self._guard(self.cases[k].path, read)


class WsiTileSource(_Base):
  """Tissue tiles of whole-slide images (level, tile size and kept tiles fixed at indexing)."""

  def __init__(self, slides: Sequence[Slide], grids: Sequence[TileGrid], *, skips: SkipLog,
               lenient: bool = False, labels: Sequence[int] | None = None):
    """labels: a class per slide (e.g. its project folder), given to each of its tiles."""
    super().__init__(skips, lenient)
    self.slides = list(slides)
    self.grids = list(grids)
    self.labels = None if labels is None else [int(v) for v in labels]
    self.has_labels = self.labels is not None
    self.index = np.asarray([(s, t) for s, g in enumerate(self.grids) for t in range(len(g.yx))],
                            np.int64).reshape(-1, 2)

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int):
    s, t = (int(v) for v in self.index[i])
    slide, grid = self.slides[s], self.grids[s]
    y, x = (int(v) for v in grid.yx[t])

    def read():
      rec = {"image": slide.read_region(grid.level, y, x, grid.tile_size, grid.tile_size)}
      if self.has_labels:
        rec["label"] = np.int32(self.labels[s])
      return rec

    return self._guard(slide.path, read)


class TfdsSource(_Base):
  """A TFDS array_record data source (`builder.as_data_source(split)`): decoded without TensorFlow.

  3D examples are taken as prepared sub-volumes: each is one example ('whole' geometry).
  """

  def __init__(self, data_source, *, image_key: str, label_key: str = "", mask_key: str = "",
               spacing_key: str = "", what: str, mask_values: Sequence[int] = (),
               mask_binarize: bool = False, skips: SkipLog, lenient: bool = False,
               nonfinite: str = "error"):
    super().__init__(skips, lenient)
    self.mask_binarize = bool(mask_binarize)
    self.data_source = data_source
    self.image_key, self.label_key = image_key, label_key
    self.mask_key, self.spacing_key = mask_key, spacing_key
    self.what = what
    self.mask_values = tuple(int(v) for v in mask_values)
    self.nonfinite = nonfinite
    self.has_labels = bool(label_key)
    self.has_masks = bool(mask_key)

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, i: int):
    where = f"{self.what}[{i}]"

    def read():
      try:
        ex = self.data_source[i]
      except Exception as e:  # array_record/protobuf errors have no common base class
        raise DataError(where, f"cannot read the record ({type(e).__name__}: {e})") from e
      if self.image_key not in ex:
        raise DataError(where, f"expected a feature {self.image_key!r} (data.tfds.image_key), found "
                        f"{sorted(ex)}")
      image = np.asarray(ex[self.image_key])
      rec = {"image": check_finite(image, where, self.nonfinite)}
      if self.has_labels:
        rec["label"] = np.asarray(ex[self.label_key]).astype(np.int32)
      if self.has_masks:
        rec["mask"] = remap_mask(np.asarray(ex[self.mask_key]), self.mask_values, where,
                                 self.mask_binarize)
      if self.spacing_key:
        rec["spacing"] = np.asarray(ex[self.spacing_key], np.float32)
      return rec

    return self._guard(where, read)


class TextSource(_Base):
  """Texts (reports, sentences) as token ids: 'tokens', 'attention_mask', 'word_ids' ((max_length,)
  int32, see `tokenization.encode`) and 'label' when every record has one.

  Holds the records (text, label, "file:line") and the tokenizer's path: the tokenizer is loaded on
  first use in each process (it is not pickled when grain sends the source to a worker) and each
  example is encoded when read (tens of microseconds), so nothing encoded is held.
  """

  def __init__(self, records: Sequence[TextRecord], *, tokenizer: str, max_length: int,
               lowercase: bool = True, skips: SkipLog, lenient: bool = False):
    super().__init__(skips, lenient)
    self.records = [TextRecord(*r) for r in records]
    self.tokenizer_path = str(tokenizer or "")
    self.max_length = int(max_length)
    self.lowercase = bool(lowercase)
    self.has_labels = bool(self.records) and all(r.label is not None for r in self.records)
    self._lock = threading.Lock()
    self._tokenizer = None
    self._ids: dict[str, int] = {}

  def __len__(self) -> int:
    return len(self.records)

  def tokenizer(self):
    """The tokenizer of this process (loaded once); an empty data.text.tokenizer is an error."""
    if self._tokenizer is None:
      with self._lock:
        if self._tokenizer is None:
          if not self.tokenizer_path:
            raise DataError(None, "data.text.tokenizer is empty: expected a tokenizer.json or vocab.txt; "
                            "call invcoss_jax.data.tokenization.ensure_tokenizer(cfg.data, workdir) "
                            "first (it trains one on the train split, or reuses workdir/tokenizer.json)")
          tok = tokenization.load_tokenizer(self.tokenizer_path, lowercase=self.lowercase)
          self._ids = tokenization.special_ids(tok)
          self._tokenizer = tokenization.without_padding(tok)
    return self._tokenizer

  def __getitem__(self, i: int):
    rec = self.records[i]
    tok = self.tokenizer()
    out = {k: np.empty(self.max_length, np.int32) for k in ("tokens", "attention_mask", "word_ids")}
    tokenization.encode_into(tok, self._ids, rec.text, self.max_length, out["tokens"],
                             out["attention_mask"], out["word_ids"])
    if self.has_labels:
      out["label"] = np.int32(rec.label)
    return out

  # The lock and the loaded tokenizer stay in their process (grain pickles sources for its workers).
  def __getstate__(self):
    state = dict(self.__dict__)
    state.update(_lock=None, _tokenizer=None, _ids={})
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
