"""From `config.data` to a data source: finding the files of a split in each format.

`make_source` returns the random-access source (grain's protocol) the pipelines read;
`make_case_source` gives whole volumes for sliding-window inference.
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import Any, Callable

import ml_collections
import numpy as np

from invcoss_jax.data import catalog, image_io, text_io, volume_io, wsi
from invcoss_jax.data.errors import DataError, MissingDataError, SkipLog, logger
from invcoss_jax.data.preprocessing import volume_geometry
from invcoss_jax.data.registry import resolve
from invcoss_jax.data.sources import (DicomSliceSource, ImageFolderSource, NpzSource, TextSource,
                                      TfdsSource, VolumeSource, WsiTileSource)
from invcoss_jax.data.transforms import hu_to_unit, percentile_zscore, resample_to_spacing


def make_source(data_cfg: ml_collections.ConfigDict, split: str | None = None):
  """The random-access source of `split` (default `data.split`) of the configured dataset."""
  cfg = resolve(data_cfg)
  split = cfg.split if split is None else split
  skips = SkipLog(f"data.name={cfg.name} ({cfg.format} at {cfg.path}, split {split!r})")
  builders = {"npz": _npz_source, "images": _images_source, "nifti": _nifti_source,
              "dicom": _dicom_source, "wsi": _wsi_source, "tfds": _tfds_source, "text": _text_source}
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
  """Examples of the split: images, tiles, windows of volumes, or texts (no tokenizer needed)."""
  return len(make_source(data_cfg, split))


def _not_empty(files: list[str], root: str, what: str) -> list[str]:
  if not files:
    raise MissingDataError(None, f"data.path={root!r} holds no {what}: expected at least one")
  return files


def min_image_size(cfg) -> int:
  """The smallest side a 2D image may have (data.min_image_size, capped at data.image_size)."""
  return min(int(cfg.min_image_size), int(cfg.image_size))


def _naming(cfg) -> catalog.Naming:
  return catalog.Naming(cfg.image_prefix, cfg.image_suffix, cfg.label_prefix, cfg.label_suffix)


def _folder_cases(cfg, split: str, skips: SkipLog, *, suffixes: tuple[str, ...], what: str,
                  find: Callable[[str], list[str]], labels_ok: bool = True) -> list[catalog.Case]:
  """The cases of `split` under data.path: files (or DICOM series folders) found by `find`, paired
  with their label maps, given class labels from sub-folders, and split (see catalog.split_root)."""
  catalog.require_path(cfg.path, what)
  fractions = tuple(cfg.split_fractions)
  by_depth = cfg.split_by == "depth"
  if os.path.isfile(cfg.path):
    root, native, items = os.path.dirname(cfg.path), False, [cfg.path]
  else:
    root, native = catalog.split_root(cfg.path, "all" if by_depth else split, fractions)
    items = _not_empty(find(root), root, what)
  naming = _naming(cfg)
  if cfg.label_path:
    if not labels_ok:
      raise DataError(None, f"data.label_path with data.format={cfg.format!r}: label maps are read "
                      "for 'nifti' volumes and 'images' only (convert DICOM series with e.g. dcm2niix)")
    sub = os.path.relpath(root, cfg.path) if root.startswith(cfg.path.rstrip(os.sep) + os.sep) else ""
    lroot = os.path.join(cfg.label_path, sub) if sub else cfg.label_path
    cases = catalog.pair_with_labels(items, root, lroot, suffixes, naming=naming,
                                     skips=skips if cfg.lenient else None)
  else:
    cases = [catalog.Case(f, None, None, naming.image_id(f, root, suffixes)) for f in items]
  if cfg.class_subfolders:
    cases = catalog.with_class_labels(cases, root)
  if native or by_depth:
    return cases
  strata = [c.label for c in cases] if cfg.class_subfolders else None
  idx = catalog.split_indices(len(cases), split, fractions, int(cfg.split_seed),
                              what=f"data.path={cfg.path!r}", strata=strata)
  return [cases[i] for i in idx]


def _npz_source(cfg, split: str, skips: SkipLog) -> NpzSource:
  catalog.require_path(cfg.path, "an .npz file or a folder of .npz shards")
  root, native_folder = ((cfg.path, False) if os.path.isfile(cfg.path) else
                         catalog.split_root(cfg.path, split, tuple(cfg.split_fractions)))
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
        _check_npz_arrays(f, ikey, info[ikey], lkey, info.get(lkey), int(cfg.spatial_dims),
                          min_image_size(cfg))
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
  return NpzSource(parts, rows, skips=skips, lenient=bool(cfg.lenient), nonfinite=cfg.nonfinite)


def _check_npz_arrays(path: str, ikey: str, image_info, lkey: str, label_info, spatial_dims: int,
                      min_size: int = 0) -> None:
  """Images of an .npz: real numbers, one example per row, (N, H, W[, C]) or (N, D, H, W[, 1]), 2D images of
  sides >= `min_size`; labels numeric with one row per image. Checked from the headers, before anything is
  decompressed."""
  shape, dtype = image_info
  if dtype.kind not in "biuf":
    what = {"c": "complex numbers", "U": "strings", "S": "bytes", "O": "Python objects"}.get(dtype.kind, f"{dtype}")
    raise DataError(path, f"array {ikey!r} holds {what} (dtype {dtype}): expected real-valued images "
                    "(uint8, integers or floats)")
  ranks = (3, 4) if spatial_dims == 2 else (4, 5)
  layout = "(N, H, W) or (N, H, W, C)" if spatial_dims == 2 else "(N, D, H, W) or (N, D, H, W, 1)"
  if len(shape) not in ranks:
    hint = (" - it looks flattened: store each image with its height and width" if len(shape) == 2 else
            " - a volume? set data.modality to ct/mri (3D)" if spatial_dims == 2 and len(shape) == 5 else "")
    raise DataError(path, f"array {ikey!r} of shape {shape}: expected {layout} for "
                    f"{spatial_dims}D data{hint}")
  if len(shape) == ranks[1] and shape[-1] not in ((1, 3, 4) if spatial_dims == 2 else (1,)):
    raise DataError(path, f"array {ikey!r} of shape {shape}: its last axis ({shape[-1]}) is not a channel count "
                    f"{'(1, 3 or 4)' if spatial_dims == 2 else '(1)'}; expected {layout}")
  if spatial_dims == 2:
    image_io.check_image_size(shape[1:3], path, min_size, f"array {ikey!r} holds images")
  if label_info is not None and label_info[1].kind not in "biuf":
    raise DataError(path, f"array {lkey!r} holds dtype {label_info[1]}: expected numeric class labels")


def _images_source(cfg, split: str, skips: SkipLog) -> ImageFolderSource:
  exts = tuple(cfg.images.extensions)
  cases = _folder_cases(cfg, split, skips, suffixes=exts, what=f"2D image files {exts}",
                        find=lambda root: catalog.find_files(root, exts, exclude=[cfg.label_path]))
  return ImageFolderSource(cases, skips=skips, lenient=bool(cfg.lenient),
                           mask_values=tuple(cfg.mask_values), mask_binarize=bool(cfg.mask_binarize),
                           nonfinite=cfg.nonfinite, min_size=min_image_size(cfg))


def _volume_source(cfg, split: str, skips: SkipLog, cases, reader: str, whole: bool = False):
  slab = None
  if cfg.split_by == "depth":
    slab = functools.partial(catalog.depth_slab, split=split, fractions=tuple(cfg.split_fractions))
  return VolumeSource(cases, reader=reader, geometry=volume_geometry(cfg, whole=whole), skips=skips,
                      lenient=bool(cfg.lenient), cache_size=int(cfg.volume_cache_size),
                      mask_values=tuple(cfg.mask_values), mask_binarize=bool(cfg.mask_binarize),
                      nonfinite=cfg.nonfinite, slab=slab)


def _nifti_cases(cfg, split: str, skips: SkipLog) -> list[catalog.Case]:
  if cfg.spatial_dims != 3:
    raise DataError(None, "data.format='nifti' reads volumes: expected data.spatial_dims 0 or 3")
  sfx = volume_io.NIFTI_SUFFIXES
  return _folder_cases(cfg, split, skips, suffixes=sfx, what="NIfTI files (.nii/.nii.gz)",
                       find=lambda root: catalog.find_files(root, sfx, exclude=[cfg.label_path]))


def _nifti_source(cfg, split: str, skips: SkipLog) -> VolumeSource:
  return _volume_source(cfg, split, skips, _nifti_cases(cfg, split, skips), "nifti")


def _dicom_series_folders(root: str) -> list[str]:
  out = []
  for dirpath, dirnames, _ in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    if volume_io.list_dicom_files(dirpath):
      out.append(dirpath)
  return sorted(out)


def _dicom_cases(cfg, split: str, skips: SkipLog) -> list[catalog.Case]:
  return _folder_cases(cfg, split, skips, suffixes=(), labels_ok=False,
                       what="DICOM series (one folder of .dcm slices per series)",
                       find=_dicom_series_folders)


def _dicom_source(cfg, split: str, skips: SkipLog):
  if cfg.spatial_dims == 3:
    return _volume_source(cfg, split, skips, _dicom_cases(cfg, split, skips), "dicom")
  sfx = volume_io.DICOM_SUFFIXES
  cases = _folder_cases(cfg, split, skips, suffixes=sfx, labels_ok=False, what="DICOM slices (.dcm)",
                        find=lambda root: catalog.find_files(root, sfx))
  return DicomSliceSource(cases, skips=skips, lenient=bool(cfg.lenient), nonfinite=cfg.nonfinite,
                          min_size=min_image_size(cfg))


def _wsi_source(cfg, split: str, skips: SkipLog):
  cases = _folder_cases(cfg, split, skips, suffixes=wsi.WSI_SUFFIXES, labels_ok=False,
                        what="whole-slide images (.svs/.tif)",
                        find=lambda root: catalog.find_files(root, wsi.WSI_SUFFIXES))
  w = cfg.wsi
  slides, grids, labels = [], [], []
  for case in cases:
    f = case.path
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
    labels.append(case.label)
  return WsiTileSource(slides, grids, skips=skips, lenient=bool(cfg.lenient),
                       labels=labels if cfg.class_subfolders else None)


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
                    mask_values=tuple(cfg.mask_values), mask_binarize=bool(cfg.mask_binarize),
                    skips=skips, lenient=bool(cfg.lenient), nonfinite=cfg.nonfinite)


def _text_source(cfg, split: str, skips: SkipLog) -> TextSource:
  records = text_io.read_split(cfg, split, skips)
  t = cfg.text
  return TextSource(records, tokenizer=str(t.tokenizer), max_length=int(t.max_length),
                    lowercase=bool(t.lowercase), skips=skips, lenient=bool(cfg.lenient))


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
