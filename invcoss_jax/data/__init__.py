"""The input layer: grain pipelines over medical images on disk, and the embedded demo corpus.

Pipelines: `make_train_iterator`, `make_eval_iterator`, `image_shape`, `num_examples` (see
docs/DESIGN.md). Sources, readers and per-modality transforms are public for reuse; see docs/data.md.
"""

from invcoss_jax.data.catalog import Case, split_indices
from invcoss_jax.data.config import data_config
from invcoss_jax.data.errors import DataError, SkipLog
from invcoss_jax.data.image_io import npz_array_info, read_image
from invcoss_jax.data.pipeline import (CaseSource, image_shape, make_case_source, make_eval_iterator,
                                       make_preprocessor, make_source, make_train_iterator,
                                       num_examples, volume_geometry)
from invcoss_jax.data.registry import DATASETS, DEMO_ROOT, known_names, num_classes, resolve
from invcoss_jax.data.sources import (DicomSliceSource, ImageFolderSource, NpzSource, TfdsSource,
                                      VolumeSource, WsiTileSource, check_finite, remap_mask)
from invcoss_jax.data.transforms import (Natural2D, Preprocessed, Slice2D, Volume3D, VolumeGeometry,
                                         hu_to_unit, percentile_zscore, random_flip,
                                         random_resized_crop_box, resample, resample_to_spacing,
                                         resize_2d, target_grid_shape, to_channels, to_unit_range,
                                         window_map, window_starts)
from invcoss_jax.data.volume_io import (VolumeHeader, dicom_series_header, nifti_header,
                                        read_dicom_series, read_dicom_slice, read_nifti)
from invcoss_jax.data.wsi import Slide, TileGrid, tissue_mask, tissue_tiles
