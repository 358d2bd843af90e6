"""Dataset names: the embedded demo corpus and `folder` (your own files), resolved into full configs.

A name supplies the identity fields that `config.data` leaves empty (format, path, label_path,
modality, splits, label values, classes). When `data.path` is set, the name's files are not used at
all, so `--config.data.path=/data/adni --config.data.format=nifti` reads your files with the name's
modality; `name=folder` supplies nothing.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from invcoss_jax.data.config import data_config
from invcoss_jax.data.errors import DataError

DEMO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")

FORMATS = ("nifti", "dicom", "images", "npz", "wsi", "tfds")
MODALITIES = ("xray", "ct", "mri", "path")

# TotalSegmentator v2 class ids present in the demo CT's organ map (0 = background).
TOTALSEG_DEMO_VALUES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 18, 19, 20, 30, 31, 32, 33, 52,
                        63, 64, 79, 86, 87, 88, 89, 98, 99, 100, 101, 102, 103, 110, 111, 112, 113,
                        114, 115, 117)

DATASETS: dict[str, dict[str, Any]] = {
    # Pre-training sets, one per modality.
    "demo_xray": dict(format="npz", path="xray/pneumoniamnist_subset.npz", modality="xray",
                      about="PneumoniaMNIST chest X-rays (28x28), pre-training"),
    "demo_ct": dict(format="nifti", path="ct/images", modality="ct",
                    about="abdominal CT (TotalSegmentator example, 3 mm), pre-training"),
    "demo_mri": dict(format="nifti", path="mri/images", modality="mri",
                     about="brain MRI crops (MSD hippocampus), pre-training"),
    "demo_path": dict(format="images", path="pathology/tiles", modality="path",
                      about="H&E tissue tiles (PNG, 64x64) from two slides, pre-training"),
    # Downstream tasks.
    "demo_pneumonia": dict(format="npz", path="xray/pneumoniamnist_subset.npz", modality="xray",
                           num_classes=2, task="classification",
                           about="PneumoniaMNIST normal (0) / pneumonia (1), train/val/test"),
    "demo_hippocampus": dict(format="nifti", path="mri/images", label_path="mri/labels",
                             modality="mri", split_fractions=(0.6, 0.2, 0.2), num_classes=3,
                             task="segmentation",
                             about="hippocampus MRI: background, anterior, posterior; cases split "
                                   "0.6/0.2/0.2 with split_seed"),
    "demo_ct_organs": dict(format="nifti", path="ct_organs/images", label_path="ct_organs/labels",
                           modality="ct", split_by="depth", split_fractions=(0.4, 0.3, 0.3),
                           mask_values=TOTALSEG_DEMO_VALUES, num_classes=len(TOTALSEG_DEMO_VALUES),
                           task="segmentation",
                           about="one CT with its TotalSegmentator organ map (values remapped to "
                                 "0..41); train/val/test are disjoint depth slabs 0.4/0.3/0.3"),
    "folder": dict(about="your files: set data.format, data.path and data.modality"),
}

_FILLED = ("format", "modality", "split_fractions", "split_by", "mask_values", "num_classes",
           "image_prefix", "image_suffix", "label_prefix", "label_suffix")


def known_names() -> list[str]:
  return sorted(DATASETS)


def _is_empty(value) -> bool:
  return value in ("", (), [], None, 0) or (isinstance(value, (tuple, list)) and not value)


def resolve(data_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `data_cfg` with the registered name's fields filled in and everything checked."""
  cfg = data_config()  # defaults for keys an older config may lack
  cfg.update(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg))
  name = str(cfg.get("name", "") or "")
  if name not in DATASETS:
    raise DataError(None, f"unknown dataset data.name={name!r}: expected one of {known_names()} "
                    "('folder' reads your files with data.format, data.path and data.modality)")
  entry = DATASETS[name]
  for key in _FILLED:
    if key in entry and _is_empty(cfg.get(key)):
      cfg[key] = entry[key]
  if not cfg.path and "path" in entry:
    cfg.path = os.path.join(DEMO_ROOT, entry["path"])
    if _is_empty(cfg.label_path) and "label_path" in entry:
      cfg.label_path = os.path.join(DEMO_ROOT, entry["label_path"])
  if cfg.format not in FORMATS:
    raise DataError(None, f"data.format={cfg.format!r}: expected one of {FORMATS} (data.name={name!r})")
  if cfg.modality not in MODALITIES:
    raise DataError(None, f"data.modality={cfg.modality!r}: expected one of {MODALITIES} "
                    f"(data.name={name!r})")
  if not cfg.path:
    raise DataError(None, f"data.path is empty: expected the {cfg.format} files to read "
                    f"(data.name={name!r})")
  if cfg.spatial_dims not in (0, 2, 3):
    raise DataError(None, f"data.spatial_dims={cfg.spatial_dims}: expected 0 (from the modality), 2 or 3")
  if cfg.spatial_dims == 0:
    cfg.spatial_dims = 3 if cfg.modality in ("ct", "mri") else 2
  if cfg.spatial_dims == 3 and cfg.modality not in ("ct", "mri"):
    raise DataError(None, f"data.spatial_dims=3 with data.modality={cfg.modality!r}: volumes are "
                    "'ct' or 'mri'")
  cfg.split_by = cfg.split_by or "case"
  if cfg.split_by not in ("case", "depth"):
    raise DataError(None, f"data.split_by={cfg.split_by!r}: expected 'case' or 'depth'")
  if cfg.nonfinite not in ("error", "zero"):
    raise DataError(None, f"data.nonfinite={cfg.nonfinite!r}: expected 'error' or 'zero'")
  vs = tuple(cfg.volume_shape)
  if cfg.spatial_dims == 3 and (len(vs) != 3 or min(vs) <= 0):
    raise DataError(None, f"data.volume_shape={vs}: expected three positive sizes (D, H, W)")
  if cfg.spatial_dims == 2 and int(cfg.image_size) <= 0:
    raise DataError(None, f"data.image_size={cfg.image_size}: expected a positive size")
  return cfg


def num_classes(data_cfg: ml_collections.ConfigDict) -> int:
  """Classes of the dataset's 'label' or 'mask' (0 when it has none or they are unknown)."""
  return int(resolve(data_cfg).num_classes)
