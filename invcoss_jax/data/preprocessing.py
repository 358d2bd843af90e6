"""From `config.data` to preprocessing: example shapes, the 3D geometry, the modality transform."""

from __future__ import annotations

from typing import Callable

import ml_collections
import numpy as np

from invcoss_jax.data.errors import DataError
from invcoss_jax.data.registry import resolve
from invcoss_jax.data.transforms import (Natural2D, Preprocessed, ReportTokens, Slice2D, Volume3D,
                                         VolumeGeometry)


def image_shape(data_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Per-example image shape: (S, S, 3) for X-ray/pathology, (S, S, 1) for 2D CT/MRI slices,
  (D, H, W, 1) for volumes, (L,) token ids (L = data.text.max_length) for reports."""
  cfg = resolve(data_cfg)
  if cfg.modality == "report":
    return (int(cfg.text.max_length),)
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
  if cfg.modality == "report":
    return ReportTokens(int(cfg.text.max_length))
  if cfg.preprocessed:
    if cfg.spatial_dims == 2 and cfg.modality in ("xray", "path"):
      o = cfg.xray if cfg.modality == "xray" else cfg.pathology
      return Preprocessed(image_shape(cfg), tuple(o.crop_scale), tuple(o.crop_ratio), bool(o.hflip),
                          bool(o.get("vflip", False)))
    m = cfg.ct if cfg.modality == "ct" else cfg.mri
    return Preprocessed(image_shape(cfg), mirror_prob=float(m.mirror_prob))
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
