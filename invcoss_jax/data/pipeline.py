"""Grain pipelines over the sources: training (infinite, shuffled, augmented) and evaluation (one pass).

    source --[process shard]--> (train: seed, shuffle, repeat, random_map | eval: map)
           --> to_iter_dataset (read threads) --> [mp_prefetch workers] --> batch

Batching comes after the worker prefetch, so the examples and their order do not depend on
`num_workers`; augmentation randomness is seeded by the example's position in the stream. The
iterators are grain `DatasetIterator`s: `get_state()` / `set_state()` resume exactly, and orbax saves
them with `grain.checkpoint.CheckpointSave` / `CheckpointRestore`.
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import Any, Callable

import grain
import ml_collections
import numpy as np

from invcoss_jax.data import catalog, image_io, volume_io, wsi
from invcoss_jax.data.errors import DataError, SkipLog, logger
from invcoss_jax.data.registry import resolve
from invcoss_jax.data.sources import (DicomSliceSource, ImageFolderSource, NpzSource, TfdsSource,
                                      VolumeSource)
from invcoss_jax.data.transforms import (Natural2D, Preprocessed, Slice2D, Volume3D, VolumeGeometry,
                                         hu_to_unit, percentile_zscore, resample_to_spacing)

# ----------------------------------------------------------------------------------------------------
# Shapes and preprocessing chosen by the config.


def image_shape(data_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Per-example image shape: (S, S, 3) for X-ray/pathology, (S, S, 1) for 2D CT/MRI slices,
  (D, H, W, 1) for volumes."""
  cfg = resolve(data_cfg)
  if cfg.spatial_dims == 3:
    return tuple(int(s) for s in cfg.volume_shape) + (1,)
  s = int(cfg.image_size)
  return (s, s, 3 if cfg.modality in ("xray", "path") else 1)


def volume_geometry(cfg: ml_collections.ConfigDict, *, whole: bool = False) -> VolumeGeometry:
  """The windowing/resampling of the resolved config's 3D modality."""
  m = cfg.ct if cfg.modality == "ct" else cfg.mri
  target = tuple(float(s) for s in m.target_spacing) or None
  if target is not None and (len(target) != 3 or min(target) <= 0):
    raise DataError(None, f"data.{cfg.modality}.target_spacing={tuple(m.target_spacing)}: expected "
                    "() or three positive voxel sizes (d, h, w) in mm")
  ct = cfg.modality == "ct"
  try:
    return VolumeGeometry(
        out_shape=tuple(int(s) for s in cfg.volume_shape), target_spacing=target,
        window_depth=int(m.window_depth), window_stride=int(m.window_stride),
        mode="whole" if whole else str(cfg.volume_mode),
        trim_fraction=0.0 if ct else float(m.trim_fraction),
        crop_fraction=float(cfg.ct.center_crop_fraction) if ct else 1.0,
        crop_min_size=int(cfg.ct.center_crop_min_size) if ct else 0,
        order=int(m.interpolation_order))
  except ValueError as e:
    raise DataError(None, f"data.{cfg.modality}: {e}") from e


def make_preprocessor(data_cfg: ml_collections.ConfigDict) -> Callable[..., dict[str, np.ndarray]]:
  """The modality preprocessing of the config: `fn(record, rng=None)` -> model example."""
  cfg = resolve(data_cfg)
  if cfg.preprocessed:
    return Preprocessed(image_shape(cfg))
  if cfg.spatial_dims == 2:
    if cfg.modality in ("xray", "path"):
      o = cfg.xray if cfg.modality == "xray" else cfg.pathology
      return Natural2D(int(cfg.image_size), 3, tuple(o.crop_scale), tuple(o.crop_ratio), bool(o.hflip),
                       bool(o.get("vflip", False)), str(o.interpolation))
    m = cfg.ct if cfg.modality == "ct" else cfg.mri
    return Slice2D(int(cfg.image_size), cfg.modality, tuple(cfg.ct.hu_clip), float(cfg.ct.hu_offset),
                   tuple(cfg.mri.percentile_clip), float(m.mirror_prob))
  m = cfg.ct if cfg.modality == "ct" else cfg.mri
  return Volume3D(volume_geometry(cfg, whole=cfg.format == "tfds"), cfg.modality,
                  tuple(cfg.ct.hu_clip), float(cfg.ct.hu_offset), tuple(cfg.mri.percentile_clip),
                  float(m.mirror_prob))


# ----------------------------------------------------------------------------------------------------
# Sources by format.


def make_source(data_cfg: ml_collections.ConfigDict, split: str | None = None):
  """The random-access source of `split` (default `data.split`) of the configured dataset."""
  cfg = resolve(data_cfg)
  split = cfg.split if split is None else split
  skips = SkipLog(f"data.name={cfg.name} ({cfg.format} at {cfg.path}, split {split!r})")
  builders = {"npz": _npz_source, "images": _images_source, "nifti": _nifti_source,
              "dicom": _dicom_source, "wsi": _wsi_source, "tfds": _tfds_source}
  source = builders[cfg.format](cfg, split, skips)
  if len(skips):
    skips.log_summary()
  if len(source) == 0:
    if len(skips):
      raise DataError(cfg.path, f"every file was skipped ({skips.summary()}): expected at least one "
                      "usable example")
    raise DataError(cfg.path, f"no examples in split {split!r}: expected at least one")
  return source


def num_examples(data_cfg: ml_collections.ConfigDict, split: str | None = None) -> int:
  """Examples of the split: images, tiles, or windows of volumes."""
  return len(make_source(data_cfg, split))


def _not_empty(files: list[str], root: str, what: str) -> list[str]:
  if not files:
    raise FileNotFoundError(f"data.path={root!r} holds no {what}: expected at least one")
  return files


def _select(cases: list, cfg, split: str, native: bool, what: str) -> list:
  if native:
    return cases
  idx = catalog.split_indices(len(cases), split, tuple(cfg.split_fractions), int(cfg.split_seed),
                              what=what)
  return [cases[i] for i in idx]


def _npz_source(cfg, split: str, skips: SkipLog) -> NpzSource:
  catalog.require_path(cfg.path, "an .npz file or a folder of .npz shards")
  root, native_folder = (cfg.path, False) if os.path.isfile(cfg.path) else catalog.split_root(cfg.path, split)
  files = [root] if os.path.isfile(root) else _not_empty(catalog.find_files(root, (".npz",)), root,
                                                          ".npz files")
  ik, lk = cfg.npz.image_key, cfg.npz.label_key
  parts, counts, native = [], [], None
  for f in files:
    try:
      info = image_io.npz_array_info(f)
      keys = []
      if split in catalog.SPLITS and f"{split}_{ik}" in info:
        keys, is_native = [split], True
      elif split == "all" and any(f"{s}_{ik}" in info for s in catalog.SPLITS):
        keys, is_native = [s for s in catalog.SPLITS if f"{s}_{ik}" in info], True
      elif ik in info:
        keys, is_native = [None], False
      else:
        raise DataError(f, f"expected an array {ik!r} or {split + '_' + ik!r} (data.npz.image_key), "
                        f"found {sorted(info)}")
      if native is not None and native != is_native:
        raise DataError(f, "expected every .npz file to have the same keys as the first one")
      native = is_native
      for s in keys:
        ikey = ik if s is None else f"{s}_{ik}"
        lkey = lk if s is None else f"{s}_{lk}"
        n = info[ikey][0][0]
        if lkey in info and info[lkey][0][0] != n:
          raise DataError(f, f"{lkey!r} has {info[lkey][0][0]} rows: expected {n} like {ikey!r}")
        parts.append((f, ikey, lkey if lkey in info else None))
        counts.append(n)
    except DataError as e:
      if not cfg.lenient:
        raise
      skips.skip(f, e.problem)
  labelled = {p[2] is not None for p in parts}
  if len(labelled) > 1:
    parts = [(f, i, None) for f, i, _ in parts]
    logger.warning("%s: some .npz files have labels and some do not: labels dropped", cfg.path)
  rows = [(p, r) for p, n in enumerate(counts) for r in range(n)]
  if not (native or native_folder):
    idx = catalog.split_indices(len(rows), split, tuple(cfg.split_fractions), int(cfg.split_seed),
                                what=f"data.path={cfg.path!r}")
    rows = [rows[i] for i in idx]
  return NpzSource(parts, rows, skips=skips, lenient=bool(cfg.lenient))


def _images_source(cfg, split: str, skips: SkipLog) -> ImageFolderSource:
  catalog.require_path(cfg.path, "a folder of 2D images")
  root, native = catalog.split_root(cfg.path, split)
  exts = tuple(cfg.images.extensions)
  files = _not_empty(catalog.find_files(root, exts, exclude=[cfg.label_path]), root,
                     f"image files {exts}")
  if cfg.label_path:
    lroot = os.path.join(cfg.label_path, split) if native else cfg.label_path
    cases = catalog.pair_with_labels(files, root, lroot, exts, image_suffix=cfg.image_suffix,
                                     label_suffix=cfg.label_suffix,
                                     skips=skips if cfg.lenient else None)
  else:
    cases = [catalog.Case(f, None, None, catalog.case_id(f, root, exts)) for f in files]
  if cfg.images.class_subfolders:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                     and not d.startswith("."))
    labelled = []
    for c in cases:
      top = os.path.relpath(c.path, root).split(os.sep)[0]
      if top not in classes:
        raise DataError(c.path, f"expected images inside class sub-folders of {root} "
                        "(data.images.class_subfolders=True)")
      labelled.append(catalog.Case(c.path, c.label_path, classes.index(top), c.case_id))
    cases = labelled
  cases = _select(cases, cfg, split, native, f"data.path={cfg.path!r}")
  return ImageFolderSource(cases, skips=skips, lenient=bool(cfg.lenient),
                           mask_values=tuple(cfg.mask_values))


def _volume_cases(cfg, split: str, skips: SkipLog, files: list[str], root: str, native: bool,
                  suffixes) -> list[catalog.Case]:
  if cfg.label_path:
    lroot = os.path.join(cfg.label_path, split) if native else cfg.label_path
    cases = catalog.pair_with_labels(files, root, lroot, suffixes, image_suffix=cfg.image_suffix,
                                     label_suffix=cfg.label_suffix,
                                     skips=skips if cfg.lenient else None)
  else:
    cases = [catalog.Case(f, None, None, catalog.case_id(f, root, suffixes)) for f in files]
  if cfg.split_by == "depth":
    return cases
  return _select(cases, cfg, split, native, f"data.path={cfg.path!r}")


def _volume_source(cfg, split: str, skips: SkipLog, cases, reader: str, whole: bool = False):
  slab = None
  if cfg.split_by == "depth":
    slab = functools.partial(catalog.depth_slab, split=split, fractions=tuple(cfg.split_fractions))
  return VolumeSource(cases, reader=reader, geometry=volume_geometry(cfg, whole=whole), skips=skips,
                      lenient=bool(cfg.lenient), cache_size=int(cfg.volume_cache_size),
                      mask_values=tuple(cfg.mask_values), nonfinite=cfg.nonfinite, slab=slab)


def _nifti_cases(cfg, split: str, skips: SkipLog):
  catalog.require_path(cfg.path, "a folder of NIfTI volumes (.nii/.nii.gz)")
  if cfg.spatial_dims != 3:
    raise DataError(None, "data.format='nifti' reads volumes: expected data.spatial_dims 0 or 3")
  if os.path.isfile(cfg.path):
    root, native, files = os.path.dirname(cfg.path), False, [cfg.path]
  else:
    root, native = catalog.split_root(cfg.path, split)
    files = _not_empty(catalog.find_files(root, volume_io.NIFTI_SUFFIXES, exclude=[cfg.label_path]),
                       root, "NIfTI files (.nii/.nii.gz)")
  return _volume_cases(cfg, split, skips, files, root, native, volume_io.NIFTI_SUFFIXES)


def _nifti_source(cfg, split: str, skips: SkipLog) -> VolumeSource:
  return _volume_source(cfg, split, skips, _nifti_cases(cfg, split, skips), "nifti")


def _dicom_series_folders(root: str) -> list[str]:
  out = []
  for dirpath, dirnames, _ in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    if volume_io.list_dicom_files(dirpath):
      out.append(dirpath)
  return sorted(out)


def _dicom_cases(cfg, split: str, skips: SkipLog):
  catalog.require_path(cfg.path, "a folder of DICOM series (one folder per series)")
  root, native = catalog.split_root(cfg.path, split)
  if cfg.label_path:
    raise DataError(None, "data.label_path with data.format='dicom': label maps are read for 'nifti' "
                    "volumes only (convert the series with e.g. dcm2niix)")
  folders = _not_empty(_dicom_series_folders(root), root, "DICOM series (folders of .dcm files)")
  cases = [catalog.Case(f, None, None, os.path.relpath(f, root)) for f in folders]
  return _select(cases, cfg, split, native, f"data.path={cfg.path!r}")


def _dicom_source(cfg, split: str, skips: SkipLog):
  if cfg.spatial_dims == 3:
    return _volume_source(cfg, split, skips, _dicom_cases(cfg, split, skips), "dicom")
  catalog.require_path(cfg.path, "DICOM slices (.dcm)")
  if os.path.isfile(cfg.path):
    return DicomSliceSource([cfg.path], skips=skips, lenient=bool(cfg.lenient), nonfinite=cfg.nonfinite)
  root, native = catalog.split_root(cfg.path, split)
  files = _not_empty(catalog.find_files(root, volume_io.DICOM_SUFFIXES), root, "DICOM slices (.dcm)")
  files = _select(files, cfg, split, native, f"data.path={cfg.path!r}")
  return DicomSliceSource(files, skips=skips, lenient=bool(cfg.lenient), nonfinite=cfg.nonfinite)


def _wsi_source(cfg, split: str, skips: SkipLog):
  from invcoss_jax.data.sources import WsiTileSource  # pylint: disable=g-import-not-at-top
  catalog.require_path(cfg.path, "whole-slide images (.svs/.tif)")
  if os.path.isfile(cfg.path):
    files, native = [cfg.path], True
  else:
    root, native = catalog.split_root(cfg.path, split)
    files = _not_empty(catalog.find_files(root, wsi.WSI_SUFFIXES), root, "whole-slide images")
  files = _select(files, cfg, split, native, f"data.path={cfg.path!r}")
  w = cfg.wsi
  slides, grids = [], []
  for f in files:
    try:
      slide = wsi.Slide(f)
      grid = wsi.tissue_tiles(slide, level=int(w.level), tile_size=int(w.tile_size),
                              tissue_threshold=float(w.tissue_threshold),
                              saturation_threshold=float(w.saturation_threshold),
                              brightness_threshold=float(w.brightness_threshold))
    except DataError as e:
      if not cfg.lenient:
        raise
      skips.skip(f, e.problem)
      continue
    n = len(grid.yx)
    if int(w.max_tiles_per_slide) > 0 and n > int(w.max_tiles_per_slide):
      rng = np.random.default_rng([int(w.tile_seed), zlib.crc32(os.path.basename(f).encode())])
      keep = np.sort(rng.choice(n, int(w.max_tiles_per_slide), replace=False))
      grid = wsi.TileGrid(grid.level, grid.tile_size, grid.yx[keep], grid.tissue[keep])
    if n == 0:
      logger.info("%s: no tile with >= %.0f%% tissue", f, 100 * float(w.tissue_threshold))
    slides.append(slide)
    grids.append(grid)
  return WsiTileSource(slides, grids, skips=skips, lenient=bool(cfg.lenient))


def _tfds_source(cfg, split: str, skips: SkipLog) -> TfdsSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  catalog.require_path(cfg.path, "a prepared TFDS dataset (its version folder, or data_dir with "
                       "data.tfds.name)")
  try:
    if cfg.tfds.name:
      builder = tfds.builder(cfg.tfds.name, data_dir=cfg.path)
    else:
      builder = tfds.builder_from_directory(cfg.path)
    splits = sorted(builder.info.splits.keys())
    if split == "all":
      split = "+".join(splits)
    elif split not in splits:
      raise DataError(cfg.path, f"data.split={split!r}: expected one of {splits + ['all']}")
    source = builder.as_data_source(split=split)
  except DataError:
    raise
  except Exception as e:  # tfds raises many types (DatasetNotFoundError, FileNotFoundError, ...)
    raise DataError(cfg.path, f"cannot open the TFDS dataset ({type(e).__name__}: {e}); expected a "
                    "dataset prepared with file_format='array_record'") from e
  features = set(builder.info.features.keys())
  t = cfg.tfds
  if t.image_key not in features:
    raise DataError(cfg.path, f"data.tfds.image_key={t.image_key!r}: expected one of {sorted(features)}")
  for key in ("mask_key", "spacing_key"):
    if t[key] and t[key] not in features:
      raise DataError(cfg.path, f"data.tfds.{key}={t[key]!r}: expected one of {sorted(features)}")
  label_key = t.label_key if t.label_key in features else ""
  return TfdsSource(source, image_key=t.image_key, label_key=label_key, mask_key=t.mask_key,
                    spacing_key=t.spacing_key, what=f"{cfg.path}:{split}",
                    mask_values=tuple(cfg.mask_values), skips=skips, lenient=bool(cfg.lenient),
                    nonfinite=cfg.nonfinite)


# ----------------------------------------------------------------------------------------------------
# Whole cases (for sliding-window inference at native resolution).


class CaseSource:
  """Whole volumes of a NIfTI/DICOM dataset on the target grid, intensity-normalised like the
  windows (CT: HU -> [-1, 1]; MRI: percentile clip + z-score over the volume), not resized to
  `volume_shape`: {'image': (D, H, W, 1) float32, 'mask': (D, H, W) int32, 'spacing', 'case_id'}."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, split: str | None = None):
    cfg = resolve(data_cfg)
    if cfg.format not in ("nifti", "dicom") or cfg.spatial_dims != 3:
      raise DataError(None, f"whole cases need volumes: data.format={cfg.format!r} is not nifti/dicom")
    split = cfg.split if split is None else split
    skips = SkipLog(f"data.name={cfg.name} cases ({split!r})")
    cases = (_nifti_cases if cfg.format == "nifti" else _dicom_cases)(cfg, split, skips)
    self.volumes = _volume_source(cfg, split, skips, cases, cfg.format, whole=True)
    self.modality = cfg.modality
    self.cfg = cfg

  def __len__(self) -> int:
    return len(self.volumes.cases)

  def __getitem__(self, k: int) -> dict[str, Any]:
    vol, mask, spacing = self.volumes.read_case(k)
    m = self.cfg.ct if self.modality == "ct" else self.cfg.mri
    target = tuple(float(s) for s in m.target_spacing) or None
    if self.modality == "ct":
      image = hu_to_unit(vol, tuple(self.cfg.ct.hu_clip), float(self.cfg.ct.hu_offset))
    else:
      image = vol
    if target is not None:
      image = resample_to_spacing(image, spacing, target, int(m.interpolation_order))
      mask = None if mask is None else resample_to_spacing(mask, spacing, target, 0)
    if self.modality == "ct":
      image = np.clip(image, -1.0, 1.0)
    else:
      image = percentile_zscore(image, tuple(self.cfg.mri.percentile_clip))
    out = {"image": image[..., None].astype(np.float32),
           "spacing": np.asarray(target or spacing, np.float32),
           "case_id": self.volumes.cases[k].case_id}
    if mask is not None:
      out["mask"] = mask.astype(np.int32)
    return out


def make_case_source(data_cfg: ml_collections.ConfigDict, split: str | None = None) -> CaseSource:
  return CaseSource(data_cfg, split)


# ----------------------------------------------------------------------------------------------------
# Iterators.


class _Augment(grain.transforms.RandomMap):
  def __init__(self, fn):
    self.fn = fn

  def random_map(self, element, rng: np.random.Generator):
    return self.fn(element, rng)


class _Preprocess(grain.transforms.Map):
  def __init__(self, fn):
    self.fn = fn

  def map(self, element):
    return self.fn(element, None)


class _ReportSkipsIterator(grain.DatasetIterator):
  """Passes batches through; at the end of the pass logs how many files lenient loading skipped."""

  def __init__(self, parent: grain.DatasetIterator, skips: SkipLog):
    super().__init__(parent)
    self._skips = skips

  def __next__(self):
    try:
      return next(self._parent)
    except StopIteration:
      self._skips.log_summary()
      raise

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class _ReportSkips(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, skips: SkipLog):
    super().__init__(parent)
    self._skips = skips

  def __iter__(self) -> grain.DatasetIterator:
    return _ReportSkipsIterator(self._parent.__iter__(), self._skips)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (not at module level: grain workers import us)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}: expected 0 <= index < process_count={process_count}")
  return int(process_index), int(process_count)


def _shard(source, cfg, process_index: int, process_count: int, split: str) -> grain.MapDataset:
  ds = grain.MapDataset.source(source)
  ds = ds[process_index::process_count]  # disjoint, covering: example i goes to process i % count
  if len(ds) == 0:
    raise DataError(cfg.path, f"split {split!r} has {len(source)} example(s): too few for "
                    f"{process_count} processes (process {process_index} gets none)")
  return ds


def _to_iter(ds: grain.MapDataset, cfg) -> grain.IterDataset:
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(int(cfg.read_threads), 1),
                                            prefetch_buffer_size=max(int(cfg.prefetch_buffer_size), 1)))
  if int(cfg.num_workers) > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; outside absl.app.run (notebooks, scripts, tests)
      # nothing parsed them and grain would raise UnparsedFlagAccessError: use the defaults.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(cfg.num_workers), per_worker_buffer_size=int(cfg.worker_buffer_size)))
  return it


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Infinite iterator of local batches (global_batch_size // process_count examples).

  Each process reads its own disjoint shard of the examples, reshuffled every epoch; augmentation
  (when data.augment) is random per example and epoch; everything is a function of `seed`.
  """
  cfg = resolve(data_cfg)
  pi, pc = _process(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % pc:
    raise ValueError(f"global_batch_size={global_batch_size}: expected a positive multiple of the "
                     f"process count {pc}")
  source = make_source(cfg, cfg.split)
  fn = make_preprocessor(cfg)
  ds = _shard(source, cfg, pi, pc, cfg.split).seed(int(seed)).shuffle().repeat(None)
  augment = bool(cfg.augment) and not bool(cfg.preprocessed)
  ds = ds.random_map(_Augment(fn)) if augment else ds.map(_Preprocess(fn))
  return iter(_to_iter(ds, cfg).batch(global_batch_size // pc, drop_remainder=True))


def make_eval_iterator(data_cfg: ml_collections.ConfigDict, *, batch_size: int, split: str | None = None,
                       process_index: int | None = None,
                       process_count: int | None = None) -> grain.DatasetIterator:
  """One pass over this process's shard of `split` (default data.split) in a fixed order, without
  augmentation, in batches of `batch_size` with the last batch ragged (not dropped)."""
  cfg = resolve(data_cfg)
  split = cfg.split if split is None else split
  pi, pc = _process(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size}: expected a positive batch size")
  source = make_source(cfg, split)
  ds = _shard(source, cfg, pi, pc, split).map(_Preprocess(make_preprocessor(cfg)))
  it = _to_iter(ds, cfg).batch(batch_size, drop_remainder=False)
  if cfg.lenient:
    it = _ReportSkips(it, source.skips)
  return iter(it)


__all__ = ["image_shape", "make_source", "num_examples", "make_train_iterator", "make_eval_iterator",
           "make_preprocessor", "volume_geometry", "CaseSource", "make_case_source"]
