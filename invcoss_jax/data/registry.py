"""Dataset names: the embedded demo corpus and `folder` (your own files), resolved into full configs.

A name supplies the identity fields that `config.data` leaves empty (format, path, label_path,
modality, splits, label values, classes, text columns). When `data.path` is set, the name's files are
not used at all, so `--config.data.path=/data/adni --config.data.format=nifti` reads your files with
the name's modality; `name=folder` supplies nothing. A name without embedded files (`indiana_reports`)
needs `data.path`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections

from invcoss_jax.data import text_io
from invcoss_jax.data.config import data_config
from invcoss_jax.data.errors import DataError

DEMO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")

FORMATS = ("nifti", "dicom", "images", "npz", "wsi", "tfds", "text")
MODALITIES = ("xray", "ct", "mri", "path", "report")

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
    # Text. The reports are not embedded (they stay in ../shared/data/report): pass data.path.
    "indiana_reports": dict(format="text", modality="report", split_fractions=(0.8, 0.1, 0.1),
                            text=dict(text_columns=("findings", "impression")),
                            path_hint="the Indiana University chest X-ray reports CSV, e.g. "
                                      "--config.data.path=../shared/data/report/indiana_reports.csv",
                            about="Indiana University (Open-i) chest X-ray reports, findings + "
                                  "impression; normal vs abnormal with text.label_column=Problems "
                                  "text.label_rule=normal_vs_abnormal; 0.8/0.1/0.1 of the rows"),
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
  given = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  text = given.get("text")
  if isinstance(text, Mapping) and isinstance(text.get("label_map"), Mapping):
    # The default () types the field as a tuple: a mapping is given as its 'value=id' entries.
    text = dict(text)
    text["label_map"] = tuple(f"{k}={v}" for k, v in text["label_map"].items())
    given = dict(given, text=text)
  cfg.update(given)
  name = str(cfg.name or "")
  if name not in DATASETS:
    raise DataError(None, f"unknown dataset data.name={name!r}: expected one of {known_names()} "
                    "('folder' reads your files with data.format, data.path and data.modality)")
  entry = DATASETS[name]
  for key in _FILLED:
    if key in entry and _is_empty(cfg.get(key)):
      cfg[key] = entry[key]
  for key, value in entry.get("text", {}).items():
    if _is_empty(cfg.text.get(key)):
      cfg.text[key] = value
  if not cfg.path and "path" in entry:
    cfg.path = os.path.join(DEMO_ROOT, entry["path"])
    if _is_empty(cfg.label_path) and "label_path" in entry:
      cfg.label_path = os.path.join(DEMO_ROOT, entry["label_path"])
  if cfg.format not in FORMATS:
    raise DataError(None, f"data.format={cfg.format!r}: expected one of {FORMATS} (data.name={name!r})")
  if cfg.format == "text" and not cfg.modality:
    cfg.modality = "report"  # text is the report modality's only format
  if cfg.modality not in MODALITIES:
    raise DataError(None, f"data.modality={cfg.modality!r}: expected one of {MODALITIES} "
                    f"(data.name={name!r})")
  if not cfg.path:
    what = entry.get("path_hint") or f"the {cfg.format} files to read"
    raise DataError(None, f"data.path is empty: expected {what} (data.name={name!r})")
  if (cfg.format == "text") != (cfg.modality == "report"):
    raise DataError(None, f"data.format={cfg.format!r} with data.modality={cfg.modality!r}: text is read "
                    "by format 'text' with modality 'report' (and only so)")
  if cfg.modality == "report":
    _check_text(cfg)
    return cfg
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
  if int(cfg.min_image_size) < 0:
    raise DataError(None, f"data.min_image_size={cfg.min_image_size}: expected >= 0 (0 accepts any size)")
  return cfg


def _check_text(cfg: ml_collections.ConfigDict) -> None:
  """Options of a text section (its examples are token sequences: spatial_dims 1)."""
  if cfg.spatial_dims not in (0, 1):
    raise DataError(None, f"data.spatial_dims={cfg.spatial_dims} with data.modality='report': expected 0 "
                    "or 1 (token sequences)")
  cfg.spatial_dims = 1
  cfg.split_by = cfg.split_by or "case"
  if cfg.split_by != "case":
    raise DataError(None, f"data.split_by={cfg.split_by!r}: text is split by case (row, report, abstract)")
  if cfg.preprocessed:
    raise DataError(None, "data.preprocessed=True with data.format='text': texts are always tokenized")
  t = cfg.text
  if t.layout not in text_io.LAYOUTS:
    raise DataError(None, f"data.text.layout={t.layout!r}: expected one of {text_io.LAYOUTS}")
  if t.label_rule not in text_io.LABEL_RULES:
    raise DataError(None, f"data.text.label_rule={t.label_rule!r}: expected one of {text_io.LABEL_RULES}")
  if t.tokenizer_kind not in ("wordpiece", "bpe"):
    raise DataError(None, f"data.text.tokenizer_kind={t.tokenizer_kind!r}: expected 'wordpiece' or 'bpe'")
  if int(t.max_length) < 3:
    raise DataError(None, f"data.text.max_length={t.max_length}: expected >= 3 ([CLS], a token, [SEP])")
  if int(t.vocab_size) <= 5:
    raise DataError(None, f"data.text.vocab_size={t.vocab_size}: expected more than the 5 special tokens")


def num_classes(data_cfg: ml_collections.ConfigDict) -> int:
  """Classes of the dataset's 'label' or 'mask' (0 when it has none or they are unknown). Text: the
  declared data.num_classes, else those of its labels (PubMed 5, normal_vs_abnormal 2, a label_map's
  largest id + 1, or the label column's distinct values)."""
  cfg = resolve(data_cfg)
  if cfg.format == "text" and not int(cfg.num_classes):
    return text_io.num_text_classes(cfg)
  return int(cfg.num_classes)


def npz_shards_section(source_data: ml_collections.ConfigDict, folder: str, *, augment: bool = False,
                       split: str = "train") -> ml_collections.ConfigDict:
  """The data section reading a folder of npz shards (key `images`, model layout and range: a synthetic set
  or a real replay buffer) written for a stage of `source_data`, resized to its example shape if needed;
  `augment`: the train iterator applies the stage's crop/flip (2D) or mirroring (3D) to them."""
  r = resolve(source_data)
  d = data_config()
  d.name, d.format, d.split = "folder", "npz", split
  d.path = os.path.abspath(folder)
  d.modality = r.modality
  d.spatial_dims = int(r.spatial_dims)
  d.image_size = int(r.image_size)
  d.volume_shape = tuple(int(s) for s in r.volume_shape)
  d.preprocessed = True
  d.augment = d.augment_preprocessed = bool(augment)
  for section in ("xray", "pathology"):
    d[section].update(r[section].to_dict())
  d.ct.mirror_prob, d.mri.mirror_prob = float(r.ct.mirror_prob), float(r.mri.mirror_prob)
  d.num_workers = int(r.num_workers)
  return d


def is_text(data_cfg: ml_collections.ConfigDict) -> bool:
  """Whether a data section reads text (format 'text', or the 'report' modality), after resolving its name."""
  return str(resolve(data_cfg).format) == "text"  # resolve() pairs format 'text' with modality 'report' 
