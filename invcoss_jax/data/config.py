"""Defaults of `config.data`: which files to read and every size and constant of their preprocessing.

Defaults follow the paper (Sec. 4.1, App. A) and MedCoSS's preprocessing. A registered dataset name
(`invcoss_jax.data.registry`) fills the identity fields left empty here (`format`, `path`,
`label_path`, `modality`, `split_fractions`, ...); every other value is read as given, so
`--config.data.<key>=...` always wins.
"""

import os

import ml_collections


def data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # What to read. `name` is a registered dataset (demo_xray, demo_ct, demo_mri, demo_path,
  # demo_pneumonia, demo_hippocampus, demo_ct_organs, indiana_reports) or `folder` for your own files.
  c.name = "demo_xray"
  c.format = ""  # nifti | dicom | images | npz | wsi | tfds | text; '' = the registered name's format
  c.path = ""  # file or folder; '' = the registered name's files
  c.label_path = ""  # folder of label maps parallel to `path` (segmentation); '' = none/registered
  c.split = "train"  # train | val | test | all
  c.modality = ""  # xray | ct | mri | path | report; '' = the registered name's modality
  # 0 = from the modality (2 for xray/path, 3 for ct/mri, 1 for report: token sequences); 2 reads CT/MRI
  # slices
  c.spatial_dims = 0
  # Splits of data without split folders/keys: fractions of cases (train, val[, test]), shuffled by
  # `split_seed` (within each class when there are class labels). With train/ (and test/) folders but
  # no val/, (train, val) fractions carve the validation set out of train/. split_by='depth' instead
  # cuts every volume into contiguous slabs with these fractions (single-volume datasets; the slabs
  # share no voxel).
  c.split_fractions = ()
  c.split_seed = 0
  c.split_by = ""  # case | depth; '' = the registered name's, else case
  # Image/label pairing by case id: image file `{image_prefix}{id}{image_suffix}.ext`, label map
  # `{label_prefix}{id}{label_suffix}.ext` (nnU-Net: image_suffix='_0000'; LiTS: image_prefix='volume-',
  # label_prefix='segmentation-'; QaTa-COV19: label_prefix='mask_').
  c.image_prefix = ""
  c.image_suffix = ""
  c.label_prefix = ""
  c.label_suffix = ""
  c.class_subfolders = False  # class labels from sub-folder names (sorted), ImageFolder layout
  c.mask_values = ()  # label-map values mapped to 0..K-1 in this order; () keeps the values
  c.mask_binarize = False  # label map -> (value > 0): 0/255 masks, instance maps (GlaS)
  c.num_classes = 0  # classes of 'label' (classification) or 'mask' (segmentation); 0 = registered/none

  # Output sizes.
  c.image_size = 224  # 2D: square side after resizing / cropping
  # 2D images (files, npz rows, DICOM slices) with a side below this many pixels are refused (an error naming
  # the file; lenient: skipped) rather than upsampled: 16 is the ViT patch side. Capped at image_size (data
  # already that small is what was asked for); 0 accepts any size.
  c.min_image_size = 16
  c.volume_shape = (16, 192, 192)  # 3D (D, H, W) of every window; multiples of the 16^3 patch
  c.volume_mode = "windows"  # windows: depth windows of each volume | whole: each volume resized

  # Arrays already in model layout and range (e.g. inversion's synthetic `npz` shards, key `images`):
  # only resized to the configured shape when needed; no modality normalisation, no augmentation.
  c.preprocessed = False
  c.augment = True  # training augmentation (the eval iterator never augments)
  # Preprocessed arrays (replay buffers) get the modality's crop/flip (2D) or mirroring (3D) too.
  c.augment_preprocessed = False
  # Bad files: False raises an error naming the file; True logs each skip and counts them.
  c.lenient = False
  # NaN/Inf pixels or voxels (float npz arrays, TIFF, NIfTI, DICOM, TFDS), checked as each file (npz: row) is
  # read: error naming it (lenient: skipped) | zero (replaced by 0 after a warning naming it)
  c.nonfinite = "error"

  # Loading.
  c.num_workers = 0  # grain worker processes; 0 = in-process (tests)
  c.worker_buffer_size = 2  # batches buffered per worker process
  c.read_threads = 2  # threads reading/preprocessing examples in each process
  c.prefetch_buffer_size = 16  # examples read ahead per process
  c.volume_cache_size = 2  # decoded volumes kept per process (windows of one volume share the read)
  # 3D windows kept per process after resampling (before mirroring); 0 = off. A small 3D dataset that fits
  # (windows x D x H x W x 4 bytes) then resamples each window once instead of every epoch.
  c.window_cache_size = 0

  # X-ray (MIMIC-CXR in MedCoSS): grey -> 3 channels, RandomResizedCrop(scale 0.2-1) + hflip, [0, 1].
  c.xray = ml_collections.ConfigDict()
  c.xray.crop_scale = (0.2, 1.0)
  c.xray.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.xray.hflip = True
  c.xray.interpolation = "bicubic"  # bicubic | bilinear | nearest

  # Pathology (TCGA tiles): RGB resized to image_size; the same crop/flip augmentation as X-ray.
  c.pathology = ml_collections.ConfigDict()
  c.pathology.crop_scale = (0.2, 1.0)
  c.pathology.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.pathology.hflip = True
  c.pathology.vflip = False
  c.pathology.interpolation = "bicubic"

  # CT (DeepLesion): HU clipped to [-1024, 1024] -> [-1, 1], resampled to 1 mm, windows of 24 slices
  # with stride 12 resized to volume_shape, random mirroring.
  c.ct = ml_collections.ConfigDict()
  c.ct.hu_clip = (-1024.0, 1024.0)
  c.ct.hu_offset = 0.0  # added to the stored values first (files storing HU + 1024 use -1024)
  c.ct.target_spacing = (1.0, 1.0, 1.0)  # (depth, height, width) mm; () keeps the file's grid
  c.ct.window_depth = 24  # slices at the target spacing
  c.ct.window_stride = 12
  c.ct.center_crop_fraction = 0.8  # central in-plane crop when the plane is wider than ...
  c.ct.center_crop_min_size = 320  # ... this many voxels at the target spacing
  c.ct.mirror_prob = 0.5  # per spatial axis
  c.ct.interpolation_order = 1  # spline order of the resampling (0 nearest, 1 linear, 3 cubic)

  # MRI (ADNI): 10 % of slices dropped at each end, windows of 16 slices with stride 8, in-plane resize,
  # intensities clipped to the [0.2, 99.8] percentiles and z-scored per window.
  c.mri = ml_collections.ConfigDict()
  c.mri.percentile_clip = (0.2, 99.8)
  c.mri.trim_fraction = 0.1  # of the slices at each end (pre-training); 0 keeps all
  c.mri.target_spacing = ()  # () keeps the file's grid
  c.mri.window_depth = 16
  c.mri.window_stride = 8
  c.mri.mirror_prob = 0.0  # MedCoSS does not mirror MRI
  c.mri.interpolation_order = 1

  # Whole-slide images (TCGA): level-0 tiles with enough tissue.
  c.wsi = ml_collections.ConfigDict()
  c.wsi.level = 0  # pyramid level the tiles are cut from
  c.wsi.tile_size = 512  # pixels at that level (MedCoSS: 512 -> resized to image_size)
  c.wsi.tissue_threshold = 0.6  # minimum tissue fraction of a kept tile
  c.wsi.saturation_threshold = 0.07  # a pixel is tissue if its HSV saturation exceeds this ...
  c.wsi.brightness_threshold = 0.92  # ... and its HSV value is below this (not glass)
  c.wsi.max_tiles_per_slide = 100  # MedCoSS keeps at most 100 per patient; <= 0 keeps all
  c.wsi.tile_seed = 0  # which tiles are kept when a slide has more

  # TFDS (array_record data sources; no TensorFlow at read time).
  c.tfds = ml_collections.ConfigDict()
  c.tfds.name = ""  # with `path` as data_dir; '' = `path` is the prepared dataset's version folder
  c.tfds.image_key = "image"
  c.tfds.label_key = "label"  # '' or absent from the features = no labels
  c.tfds.mask_key = ""
  c.tfds.spacing_key = ""  # 3D: per-example (d, h, w) spacing feature; '' = the grid is kept

  # npz files: MedMNIST keys `{split}_images`/`{split}_labels`, or `images`/`labels` in shards.
  c.npz = ml_collections.ConfigDict()
  c.npz.image_key = "images"
  c.npz.label_key = "labels"

  # Folders of 2D images.
  c.images = ml_collections.ConfigDict()
  c.images.extensions = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

  # Text (format 'text', modality 'report'): radiology reports or PubMed sentences -> token ids.
  c.text = ml_collections.ConfigDict()
  # auto | mimic (folder of .txt reports, FINDINGS + IMPRESSION kept) | table (.csv/.jsonl file) |
  # pubmed (train.txt/dev.txt/test.txt of PubMed RCT). auto: a .csv/.jsonl file is a table, a folder
  # with '###'-headed train/dev/test.txt is pubmed, any other folder holds reports.
  c.text.layout = "auto"
  c.text.text_columns = ("findings", "impression")  # table: columns joined with a space
  c.text.label_column = ""  # table: the class column; '' = unlabelled
  c.text.label_rule = ""  # '' | normal_vs_abnormal: 0 when the value is 'normal' (any case), else 1
  c.text.label_map = ()  # ('value=id', ...); () = the sorted unique values are classes 0..K-1
  # tokenizer.json or a BERT vocab.txt; '' = trained on the train split by
  # tokenization.ensure_tokenizer (the jobs call it) and kept as workdir/tokenizer.json.
  c.text.tokenizer = ""
  c.text.tokenizer_kind = "wordpiece"  # when trained: wordpiece | bpe
  # When trained: the most tokens, [PAD] [UNK] [CLS] [SEP] [MASK] included. WordPiece and BPE always hold the
  # corpus's alphabet (each character, and its ## continuation) on top of the specials: a vocab_size below that
  # is refused with the least it can be. A small corpus may yield fewer (every word a single token).
  c.text.vocab_size = 8192
  c.text.max_length = 112  # tokens per example, [CLS] and [SEP] included (the paper)
  c.text.lowercase = True  # BERT normalisation of a trained tokenizer or a vocab.txt (a .json keeps its own)
  return c


def shared_data_dir() -> str:
  """The real data shared beside a checkout (`<repo>/../shared/data`), or $INVCOSS_SHARED_DATA: benchmarks
  and the report demo read it; a user's clone has none and points the data options at its own copy."""
  env = os.environ.get("INVCOSS_SHARED_DATA", "")
  if env:
    return env
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(os.path.dirname(repo), "shared", "data")
