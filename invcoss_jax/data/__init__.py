"""The input layer: grain pipelines over medical images and clinical text on disk, and the embedded
demo corpus.

Pipelines: `make_train_iterator`, `make_eval_iterator`, `image_shape`, `num_examples` (see
docs/DESIGN.md). Sources, readers and per-modality transforms are public for reuse; see docs/data.md.
Text sections need a tokenizer first: `tokenization.ensure_tokenizer(cfg.data, workdir)`.
"""

from invcoss_jax.data import tokenization
from invcoss_jax.data.catalog import Case, split_indices
from invcoss_jax.data.config import data_config
from invcoss_jax.data.errors import DataError, SkipLog
from invcoss_jax.data.image_io import npz_array_info, read_image
from invcoss_jax.data.datasets import CaseSource, make_case_source, make_source, num_examples
from invcoss_jax.data.pipeline import make_eval_iterator, make_train_iterator
from invcoss_jax.data.preprocessing import image_shape, make_preprocessor, volume_geometry
from invcoss_jax.data.registry import DATASETS, DEMO_ROOT, known_names, num_classes, resolve
from invcoss_jax.data.sources import (DicomSliceSource, ImageFolderSource, NpzSource, TextSource,
                                      TfdsSource, VolumeSource, WsiTileSource, check_finite, remap_mask)
from invcoss_jax.data.text_io import (PUBMED_LABELS, TextRecord, read_mimic_folder, read_mimic_report,
                                      read_pubmed, read_table, report_sections)
from invcoss_jax.data.tokenization import ensure_tokenizer, load_tokenizer, train_tokenizer
from invcoss_jax.data.transforms import (Natural2D, Preprocessed, ReportTokens, Slice2D, Volume3D,
                                         VolumeGeometry, hu_to_unit, percentile_zscore, random_flip,
                                         random_resized_crop_box, resample, resample_to_spacing,
                                         resize_2d, target_grid_shape, to_channels, to_unit_range,
                                         window_map, window_starts)
from invcoss_jax.data.volume_io import (VolumeHeader, dicom_series_header, nifti_header,
                                        read_dicom_series, read_dicom_slice, read_nifti)
from invcoss_jax.data.wsi import Slide, TileGrid, tissue_mask, tissue_tiles

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
