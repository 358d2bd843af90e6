"""Readers of real files: NIfTI orientation, DICOM slices and series, whole-slide tiles, TFDS builders."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from invcoss_jax import data

from conftest import make_cfg

DEMO = data.DEMO_ROOT
CT_SMALL = os.path.join(DEMO, "ct_organs", "images", "totalseg_ct_small.nii.gz")
CMU_SVS = os.path.join(DEMO, "pathology", "wsi", "cmu-1-small-region.svs")
XRAY = os.path.join(DEMO, "xray", "pneumoniamnist_subset.npz")




def eval_batches(cfg, batch_size=64, split=None):
  return list(data.make_eval_iterator(cfg, batch_size=batch_size, split=split, process_index=0,
                                      process_count=1))


# ------------------------------------------------------------------------------------------- NIfTI


def test_nifti_is_read_in_lps_depth_first():
  import nibabel as nib
  for path in [CT_SMALL]:
    vol, spacing = data.read_nifti(path)
    ras = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)
    # RAS -> LPS flips x and y; (x, y, z) -> (D, H, W) = (z, y, x).
    np.testing.assert_array_equal(vol, np.transpose(ras[::-1, ::-1, :], (2, 1, 0)).astype(np.float32))
    assert vol.dtype == np.float32 and spacing == (3.0, 3.0, 3.0)
    assert data.nifti_header(path).shape == vol.shape


@pytest.mark.needs_shared
def test_nifti_las_file_is_reoriented(shared_data):
  import nibabel as nib
  path = shared_data / "mri" / "nibabel_testdata" / "anatomical.nii"
  assert nib.aff2axcodes(nib.load(path).affine) == ("L", "A", "S")
  vol, spacing = data.read_nifti(path)
  raw = np.asarray(nib.load(path).dataobj)  # already L on x: only y flips (A -> P)
  np.testing.assert_array_equal(vol, np.transpose(raw[:, ::-1, :], (2, 1, 0)).astype(np.float32))
  assert vol.shape == (25, 41, 33) and spacing == (2.0, 2.0, 2.0)


# ------------------------------------------------------------------------------------------- DICOM


@pytest.mark.needs_shared
def test_dicom_single_slice_in_hounsfield_units(shared_data):
  import pydicom
  path = shared_data / "ct" / "dicom" / "pydicom_CT_small.dcm"
  hu, spacing = data.read_dicom_slice(path)
  ds = pydicom.dcmread(path)
  assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
  np.testing.assert_array_equal(hu, ds.pixel_array.astype(np.float32) - 1024)
  assert hu.dtype == np.float32 and spacing == pytest.approx((0.661468, 0.661468))


@pytest.mark.needs_shared
def test_dicom_slices_as_2d_ct(shared_data):
  c = make_cfg("folder", format="dicom", modality="ct", spatial_dims=2, image_size=128, split="all",
               path=str(shared_data / "ct" / "dicom"))
  assert data.num_examples(c) == 3 and data.image_shape(c) == (128, 128, 1)
  (batch,) = eval_batches(c, batch_size=8)
  assert batch["image"].shape == (3, 128, 128, 1) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  hu, _ = data.read_dicom_slice(shared_data / "ct" / "dicom" / "pydicom_CT_small.dcm")
  # Sorted by name, CT_small (already 128x128: no resizing) comes last; HU -> clip / 1024.
  np.testing.assert_allclose(batch["image"][2, ..., 0], np.clip(hu, -1024, 1024) / 1024, atol=1e-6)


def _write_series(template, vol, spacing, folder, rng):
  """The real CT volume as a DICOM series (HU + 1024 stored, intercept -1024) in shuffled files."""
  import pydicom
  os.makedirs(folder)
  order = rng.permutation(vol.shape[0])
  for name_idx, k in enumerate(order):
    ds = pydicom.dcmread(template)
    px = (vol[k] + 1024).astype(np.int16)
    ds.Rows, ds.Columns = px.shape
    ds.PixelSpacing = [spacing[1], spacing[2]]
    ds.SliceThickness = spacing[0]
    ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[0])]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.InstanceNumber = int(rng.integers(1, 1000))  # misleading on purpose: position decides
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = px.tobytes()
    ds.save_as(os.path.join(folder, f"slice_{name_idx:03d}.dcm"))


@pytest.mark.needs_shared
def test_dicom_series_equals_the_nifti_it_came_from(shared_data, tmp_path):
  vol, spacing = data.read_nifti(CT_SMALL)
  rng = np.random.default_rng(0)
  _write_series(shared_data / "ct" / "dicom" / "pydicom_CT_small.dcm", vol, spacing,
                tmp_path / "series" / "case_a", rng)
  series, sp = data.read_dicom_series(tmp_path / "series" / "case_a")
  np.testing.assert_array_equal(series, vol)
  assert sp == pytest.approx(spacing)
  # The whole pipeline gives the same windows from the series as from the NIfTI file.
  kw = dict(modality="ct", volume_shape=(16, 32, 32), split="all")
  dcm = make_cfg("folder", format="dicom", path=str(tmp_path / "series"), **kw)
  nii = make_cfg("folder", format="nifti", path=os.path.dirname(CT_SMALL), **kw)
  assert data.num_examples(dcm) == data.num_examples(nii) == 6
  a, b = eval_batches(dcm, 8)[0], eval_batches(nii, 8)[0]
  np.testing.assert_allclose(a["image"], b["image"], atol=1e-6)


# --------------------------------------------------------------------------------------------- WSI


@pytest.mark.parametrize("which", ["cmu", pytest.param("tcga", marks=pytest.mark.needs_shared)])
def test_wsi_region_reads_stitch_tiles_exactly(which, request):
  import tifffile
  if which == "cmu":  # JPEG tiles, in the demo corpus
    path = CMU_SVS
  else:  # JPEG 2000 tiles, two pyramid levels
    path = str(request.getfixturevalue("shared_data") / "pathology" / "wsi" / "tcga-cr-7395-01a-01-ts1.svs")
  slide = data.Slide(path)
  level = slide.num_levels - 1
  full = tifffile.TiffFile(path).series[0].levels[level].asarray()[..., :3]
  H, W = slide.level_shapes[level]
  assert full.shape[:2] == (H, W)
  for y, x, h, w in [(0, 0, 64, 64), (200, 250, 300, 333), (H - 77, W - 101, 77, 101)]:
    np.testing.assert_array_equal(slide.read_region(level, y, x, h, w), full[y:y + h, x:x + w])
  with pytest.raises(data.DataError, match="outside"):
    slide.read_region(level, H - 10, 0, 20, 20)


def test_wsi_tissue_tiles_have_tissue():
  slide = data.Slide(CMU_SVS)
  grid = data.tissue_tiles(slide, level=0, tile_size=256, tissue_threshold=0.6,
                           saturation_threshold=0.07, brightness_threshold=0.92)
  H, W = slide.level_shapes[0]
  assert 0 < len(grid.yx) < (H // 256) * (W // 256)
  assert np.all(grid.yx % 256 == 0) and np.all(grid.tissue >= 0.6)
  full = slide.read_level(0)
  mask = data.tissue_mask(full, 0.07, 0.92)
  for y, x in grid.yx[:5]:
    assert mask[y:y + 256, x:x + 256].mean() >= 0.55  # mask level == tile level here: same fraction
  kept = {tuple(v) for v in grid.yx}
  rejected = [(r * 256, c * 256) for r in range(H // 256) for c in range(W // 256)
              if (r * 256, c * 256) not in kept]
  assert all(mask[y:y + 256, x:x + 256].mean() < 0.6 for y, x in rejected)


@pytest.mark.needs_shared
def test_wsi_pipeline_tiles(shared_data):
  c = make_cfg("folder", format="wsi", modality="path", image_size=64, split="all",
               path=str(shared_data / "pathology" / "wsi"))
  c.wsi.tile_size = 256
  c.wsi.max_tiles_per_slide = 12
  assert data.num_examples(c) == 24  # both slides have more than 12 tissue tiles of 256 px
  b = next(data.make_train_iterator(c, global_batch_size=6, seed=0, process_index=0, process_count=1))
  assert b["image"].shape == (6, 64, 64, 3) and b["image"].dtype == np.float32
  assert 0 <= b["image"].min() and b["image"].max() <= 1


# -------------------------------------------------------------------------------------------- TFDS

_BUILDER = '''
import numpy as np
import tensorflow_datasets as tfds


class DemoPneumoniaTiny(tfds.core.GeneratorBasedBuilder):
  """Real PneumoniaMNIST images in a Tensor feature (the Image feature would need TensorFlow)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(28, 28), dtype=np.uint8),
        "label": tfds.features.Scalar(dtype=np.int64)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples("train", 24), "test": self._generate_examples("test", 10)}

  def _generate_examples(self, split, n):
    with np.load(XRAY) as z:
      images, labels = z[split + "_images"][:n], z[split + "_labels"][:n, 0]
    for i in range(n):
      yield i, {"image": images[i], "label": int(labels[i])}
'''


@pytest.fixture(scope="module")
def tfds_build(tmp_path_factory):
  """A prepared array_record TFDS dataset of real images, built and then read through the input
  layer in a fresh interpreter (so that we can tell whether TensorFlow was imported)."""
  root = tmp_path_factory.mktemp("tfds")
  script = f"XRAY = {XRAY!r}\n" + _BUILDER + textwrap.dedent(f"""
      import sys
      b = DemoPneumoniaTiny(data_dir={str(root)!r}, file_format="array_record")
      b.download_and_prepare()
      from invcoss_jax import data
      c = data.data_config()
      c.name, c.format, c.modality, c.image_size, c.path = "folder", "tfds", "xray", 28, str(b.data_path)
      batch = next(data.make_train_iterator(c, global_batch_size=4, seed=0, process_index=0,
                                            process_count=1))
      print("read", batch["image"].shape, batch["label"].dtype, "tensorflow" in sys.modules)
      print(b.data_path)
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip().splitlines()


def test_tfds_source_matches_the_npz_it_was_built_from(tfds_build):
  c = make_cfg("folder", format="tfds", modality="xray", image_size=28, path=tfds_build[-1])
  assert data.num_examples(c, "train") == 24 and data.num_examples(c, "test") == 10
  assert data.num_examples(c, "all") == 34
  npz = make_cfg("folder", format="npz", modality="xray", image_size=28, path=XRAY)
  a = eval_batches(c, 8, "test")
  b = eval_batches(npz, 10, "test")[0]
  assert [x["image"].shape[0] for x in a] == [8, 2]
  assert a[0]["label"].dtype == np.int32 and a[0]["image"].dtype == np.float32

  def by_content(images, labels):  # TFDS stores records in hashed-key order
    pairs = sorted(zip((im.tobytes() for im in images), labels.tolist()))
    return [p[0] for p in pairs], [p[1] for p in pairs]

  ta = by_content(np.concatenate([x["image"] for x in a]), np.concatenate([x["label"] for x in a]))
  tb = by_content(b["image"], b["label"])
  assert ta == tb and len(set(ta[0])) == 10
  with pytest.raises(data.DataError, match="expected one of"):
    data.num_examples(c, "validation")


def test_tfds_is_read_without_tensorflow(tfds_build):
  """Building (Tensor features) and reading through the grain pipeline never import TensorFlow."""
  assert "read (4, 28, 28, 3) int32 False" in tfds_build
