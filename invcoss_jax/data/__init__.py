"""The input layer: grain pipelines over medical images and clinical text on disk, and the embedded
demo corpus.

Pipelines: `make_train_iterator`, `make_eval_iterator`, `image_shape`, `num_examples` (see
docs/DESIGN.md). Sources, readers and per-modality transforms are public for reuse; see docs/data.md.
Text sections need a tokenizer first: `tokenization.ensure_tokenizer(cfg.data, workdir)`.
"""

__all__ = [
    "Case",
    "CaseSource",
    "DATASETS",
    "DEMO_ROOT",
    "DataError",
    "DicomSliceSource",
    "ImageFolderSource",
    "Natural2D",
    "NpzSource",
    "PUBMED_LABELS",
    "Preprocessed",
    "ReportTokens",
    "SkipLog",
    "Slice2D",
    "Slide",
    "TextRecord",
    "TextSource",
    "TfdsSource",
    "TileGrid",
    "Volume3D",
    "VolumeGeometry",
    "VolumeHeader",
    "VolumeSource",
    "WsiTileSource",
    "check_finite",
    "data_config",
    "dicom_series_header",
    "ensure_tokenizer",
    "hu_to_unit",
    "image_shape",
    "known_names",
    "load_tokenizer",
    "make_case_source",
    "make_eval_iterator",
    "make_preprocessor",
    "make_source",
    "make_train_iterator",
    "nifti_header",
    "npz_array_info",
    "num_classes",
    "num_examples",
    "percentile_zscore",
    "random_flip",
    "random_resized_crop_box",
    "read_dicom_series",
    "read_dicom_slice",
    "read_image",
    "read_mimic_folder",
    "read_mimic_report",
    "read_nifti",
    "read_pubmed",
    "read_table",
    "remap_mask",
    "report_sections",
    "resample",
    "resample_to_spacing",
    "resize_2d",
    "resolve",
    "split_indices",
    "target_grid_shape",
    "tissue_mask",
    "tissue_tiles",
    "to_channels",
    "to_unit_range",
    "tokenization",
    "train_tokenizer",
    "volume_geometry",
    "window_map",
    "window_starts",
]

# Imported on first use (PEP 562), so that reading a config section (defaults.base_config) does not import
# jax, flax or grain through this package.
_EXPORTS = {
    "Case": "invcoss_jax.data.catalog",
    "CaseSource": "invcoss_jax.data.datasets",
    "DATASETS": "invcoss_jax.data.registry",
    "DEMO_ROOT": "invcoss_jax.data.registry",
    "DataError": "invcoss_jax.data.errors",
    "DicomSliceSource": "invcoss_jax.data.sources",
    "ImageFolderSource": "invcoss_jax.data.sources",
    "Natural2D": "invcoss_jax.data.transforms",
    "NpzSource": "invcoss_jax.data.sources",
    "PUBMED_LABELS": "invcoss_jax.data.text_io",
    "Preprocessed": "invcoss_jax.data.transforms",
    "ReportTokens": "invcoss_jax.data.transforms",
    "SkipLog": "invcoss_jax.data.errors",
    "Slice2D": "invcoss_jax.data.transforms",
    "Slide": "invcoss_jax.data.wsi",
    "TextRecord": "invcoss_jax.data.text_io",
    "TextSource": "invcoss_jax.data.sources",
    "TfdsSource": "invcoss_jax.data.sources",
    "TileGrid": "invcoss_jax.data.wsi",
    "Volume3D": "invcoss_jax.data.transforms",
    "VolumeGeometry": "invcoss_jax.data.transforms",
    "VolumeHeader": "invcoss_jax.data.volume_io",
    "VolumeSource": "invcoss_jax.data.sources",
    "WsiTileSource": "invcoss_jax.data.sources",
    "check_finite": "invcoss_jax.data.sources",
    "data_config": "invcoss_jax.data.config",
    "dicom_series_header": "invcoss_jax.data.volume_io",
    "ensure_tokenizer": "invcoss_jax.data.tokenization",
    "hu_to_unit": "invcoss_jax.data.transforms",
    "image_shape": "invcoss_jax.data.preprocessing",
    "known_names": "invcoss_jax.data.registry",
    "load_tokenizer": "invcoss_jax.data.tokenization",
    "make_case_source": "invcoss_jax.data.datasets",
    "make_eval_iterator": "invcoss_jax.data.pipeline",
    "make_preprocessor": "invcoss_jax.data.preprocessing",
    "make_source": "invcoss_jax.data.datasets",
    "make_train_iterator": "invcoss_jax.data.pipeline",
    "nifti_header": "invcoss_jax.data.volume_io",
    "npz_array_info": "invcoss_jax.data.image_io",
    "num_classes": "invcoss_jax.data.registry",
    "num_examples": "invcoss_jax.data.datasets",
    "percentile_zscore": "invcoss_jax.data.transforms",
    "random_flip": "invcoss_jax.data.transforms",
    "random_resized_crop_box": "invcoss_jax.data.transforms",
    "read_dicom_series": "invcoss_jax.data.volume_io",
    "read_dicom_slice": "invcoss_jax.data.volume_io",
    "read_image": "invcoss_jax.data.image_io",
    "read_mimic_folder": "invcoss_jax.data.text_io",
    "read_mimic_report": "invcoss_jax.data.text_io",
    "read_nifti": "invcoss_jax.data.volume_io",
    "read_pubmed": "invcoss_jax.data.text_io",
    "read_table": "invcoss_jax.data.text_io",
    "remap_mask": "invcoss_jax.data.sources",
    "report_sections": "invcoss_jax.data.text_io",
    "resample": "invcoss_jax.data.transforms",
    "resample_to_spacing": "invcoss_jax.data.transforms",
    "resize_2d": "invcoss_jax.data.transforms",
    "resolve": "invcoss_jax.data.registry",
    "split_indices": "invcoss_jax.data.catalog",
    "target_grid_shape": "invcoss_jax.data.transforms",
    "tissue_mask": "invcoss_jax.data.wsi",
    "tissue_tiles": "invcoss_jax.data.wsi",
    "to_channels": "invcoss_jax.data.transforms",
    "to_unit_range": "invcoss_jax.data.transforms",
    "train_tokenizer": "invcoss_jax.data.tokenization",
    "volume_geometry": "invcoss_jax.data.preprocessing",
    "window_map": "invcoss_jax.data.transforms",
    "window_starts": "invcoss_jax.data.transforms",
}


def __getattr__(name: str):
  import importlib  # pylint: disable=g-import-not-at-top
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  else:
    try:
      value = importlib.import_module(f"{__name__}.{name}")  # a submodule, e.g. `data.text_io`
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{name}":
        raise
      raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
