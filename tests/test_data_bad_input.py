"""Bad input on real files: a clear error naming the file and what was expected, or (lenient) a logged
skip and a count."""

import logging
import math
import os
import shutil

import numpy as np
import pytest

from invcoss_jax import data
from invcoss_jax.data import text_io, tokenization

from conftest import make_cfg

DEMO = data.DEMO_ROOT
MRI_IMAGES = os.path.join(DEMO, "mri", "images")
MRI_LABELS = os.path.join(DEMO, "mri", "labels")
FIRST_CASES = sorted(os.listdir(MRI_IMAGES))[:3]




def mri_cfg(path, **kw):
  kw.setdefault("volume_shape", (16, 32, 32))
  return make_cfg("folder", format="nifti", modality="mri", path=str(path), **kw)


def read_all(cfg, split=None):
  return list(data.make_eval_iterator(cfg, batch_size=64, split=split, process_index=0, process_count=1))


def copy_cases(dst, names=FIRST_CASES, labels=False):
  os.makedirs(dst / "images", exist_ok=True)
  for n in names:
    shutil.copy(os.path.join(MRI_IMAGES, n), dst / "images" / n)
    if labels:
      os.makedirs(dst / "labels", exist_ok=True)
      shutil.copy(os.path.join(MRI_LABELS, n), dst / "labels" / n)
  return dst / "images"


def truncate(path, keep):
  with open(path, "rb") as f:
    head = f.read(keep)
  with open(path, "wb") as f:
    f.write(head)


@pytest.fixture
def warnings_of_data(caplog):
  caplog.set_level(logging.WARNING, logger="invcoss_jax.data")
  return caplog


def test_truncated_nifti_data(tmp_path, warnings_of_data):
  images = copy_cases(tmp_path)
  bad = images / FIRST_CASES[1]
  truncate(bad, os.path.getsize(bad) // 2)  # header intact, voxel data cut
  with pytest.raises(data.DataError, match=f"{FIRST_CASES[1]}.*cannot read the voxel data.*truncated"):
    read_all(mri_cfg(images, split="all"))
  # Lenient: the other files' windows come through; one skip is logged with a count at the end.
  src = data.make_source(mri_cfg(images, split="all"))  # headers are fine: every window is indexed
  windows_bad = sum(src.cases[k].path == str(bad) for k, _ in src.index)
  out = read_all(mri_cfg(images, split="all", lenient=True))
  assert sum(b["image"].shape[0] for b in out) == len(src) - windows_bad and windows_bad > 0
  msgs = [r.getMessage() for r in warnings_of_data.records]
  assert sum(f"skipping {bad}" in m for m in msgs) == 1
  assert any("1 bad file(s)" in m and FIRST_CASES[1] in m for m in msgs)


def test_truncated_nifti_header(tmp_path):
  images = copy_cases(tmp_path)
  truncate(images / FIRST_CASES[0], 60)
  with pytest.raises(data.DataError, match=f"{FIRST_CASES[0]}: cannot read the NIfTI header"):
    data.num_examples(mri_cfg(images, split="all"))
  assert data.num_examples(mri_cfg(images, split="all", lenient=True)) > 0


def test_truncated_png_and_npz(tmp_path, warnings_of_data):
  tiles = sorted(os.listdir(os.path.join(DEMO, "pathology", "tiles")))[:4]
  os.makedirs(tmp_path / "tiles")
  for t in tiles:
    shutil.copy(os.path.join(DEMO, "pathology", "tiles", t), tmp_path / "tiles" / t)
  truncate(tmp_path / "tiles" / tiles[2], 200)
  c = make_cfg("folder", format="images", modality="path", path=str(tmp_path / "tiles"), image_size=32)
  with pytest.raises(data.DataError, match=f"{tiles[2]}: cannot decode the image"):
    read_all(c)
  c.lenient = True
  assert sum(b["image"].shape[0] for b in read_all(c)) == 3
  assert any("1 bad file(s)" in r.getMessage() for r in warnings_of_data.records)

  npz = tmp_path / "x.npz"
  shutil.copy(os.path.join(DEMO, "xray", "pneumoniamnist_subset.npz"), npz)
  truncate(npz, os.path.getsize(npz) // 3)
  with pytest.raises(data.DataError, match="x.npz: cannot read the .npz file"):
    data.num_examples(make_cfg("folder", format="npz", modality="xray", path=str(npz)))


def test_truncated_whole_slide_image(tmp_path):
  svs = tmp_path / "wsi" / "cut.svs"
  os.makedirs(svs.parent)
  shutil.copy(os.path.join(DEMO, "pathology", "wsi", "cmu-1-small-region.svs"), svs)
  truncate(svs, os.path.getsize(svs) // 2)
  c = make_cfg("folder", format="wsi", modality="path", path=str(svs.parent), image_size=32)
  c.wsi.tile_size = 256
  with pytest.raises(data.DataError, match="cut.svs"):
    read_all(c)


@pytest.mark.needs_shared
def test_images_without_labels_and_labels_without_images(shared_data, warnings_of_data):
  """The real hippocampus folder: image 118 has no label; labels 010 and 281 have no image."""
  root = shared_data / "mri" / "hippocampus"
  c = make_cfg("folder", format="nifti", modality="mri", path=str(root / "images"),
               label_path=str(root / "labels"), split="all", volume_shape=(16, 32, 32))
  with pytest.raises(data.DataError, match="hippocampus_118.nii.gz: image has no label map"):
    data.make_source(c)
  c.lenient = True
  src = data.make_source(c)
  assert len(src.skips) == 3 and len(src.cases) == 260  # 261 images - 118
  skipped = {os.path.basename(p): why for p, why in src.skips.skipped.items()}
  assert "no label map" in skipped["hippocampus_118.nii.gz"]
  assert "no image" in skipped["hippocampus_010.nii.gz"] and "no image" in skipped["hippocampus_281.nii.gz"]
  assert any("3 bad file(s)" in r.getMessage() for r in warnings_of_data.records)


def test_label_without_image_in_a_small_copy(tmp_path):
  copy_cases(tmp_path, labels=True)
  shutil.copy(os.path.join(MRI_LABELS, sorted(os.listdir(MRI_LABELS))[5]),
              tmp_path / "labels" / "orphan.nii.gz")
  c = mri_cfg(tmp_path / "images", label_path=str(tmp_path / "labels"), split="all")
  with pytest.raises(data.DataError, match="orphan.nii.gz: label map has no image"):
    data.make_source(c)


@pytest.mark.needs_shared
def test_4d_where_3d_is_expected(shared_data, tmp_path):
  four_d = shared_data / "mri" / "nibabel_testdata" / "example4d.nii.gz"
  with pytest.raises(data.DataError, match=r"example4d.nii.gz: expected a 3D volume, got a 4D array "
                     r"of shape \(128, 96, 24, 2\)"):
    data.read_nifti(four_d)
  images = copy_cases(tmp_path)
  shutil.copy(four_d, images / "example4d.nii.gz")
  with pytest.raises(data.DataError, match="example4d.nii.gz: expected a 3D volume"):
    data.make_source(mri_cfg(images, split="all"))
  src = data.make_source(mri_cfg(images, split="all", lenient=True))
  assert len(src.cases) == 3 and len(src.skips) == 1


def test_nan_and_inf_voxels(tmp_path, warnings_of_data):
  import nibabel as nib
  images = copy_cases(tmp_path)
  src_img = nib.load(images / FIRST_CASES[0])
  vol = np.asarray(src_img.dataobj).astype(np.float32)
  vol[10, 20, 15] = np.nan
  vol[11, 21, 16] = np.inf
  vol[12, 22, 17] = -np.inf
  nib.save(nib.Nifti1Image(vol, src_img.affine), images / FIRST_CASES[0])
  with pytest.raises(data.DataError, match=f"{FIRST_CASES[0]}: 3 NaN/Inf voxel"):
    read_all(mri_cfg(images, split="all"))
  c = mri_cfg(images, split="all", lenient=True)
  n_all = data.num_examples(c)
  got = sum(b["image"].shape[0] for b in read_all(c))
  assert 0 < got < n_all
  c = mri_cfg(images, split="all", nonfinite="zero")
  out = np.concatenate([b["image"] for b in read_all(c)])
  assert out.shape[0] == n_all and np.all(np.isfinite(out))
  assert any("replaced by 0" in r.getMessage() for r in warnings_of_data.records)


@pytest.mark.needs_shared
@pytest.mark.parametrize("case", ["184", "205", "210", "212"])
def test_intensity_outliers_are_bounded_by_the_percentile_clip(case, shared_data, tmp_path):
  """Volumes stored up to 1.7e6 (others below 1e4): the [0.2, 99.8] percentile clip and the z-score
  make the output finite, bounded and independent of the file's intensity scale."""
  import nibabel as nib
  src = shared_data / "mri" / "hippocampus" / "images" / f"hippocampus_{case}.nii.gz"
  raw = np.asarray(nib.load(src).dataobj)
  assert raw.max() > 1e5
  os.makedirs(tmp_path / "a")
  os.makedirs(tmp_path / "b")
  shutil.copy(src, tmp_path / "a" / src.name)
  img = nib.load(src)
  nib.save(nib.Nifti1Image(raw.astype(np.float32) / 1000.0, img.affine), tmp_path / "b" / src.name)
  a = np.concatenate([b["image"] for b in read_all(mri_cfg(tmp_path / "a", split="all"))])
  b = np.concatenate([b["image"] for b in read_all(mri_cfg(tmp_path / "b", split="all"))])
  assert np.all(np.isfinite(a)) and np.abs(a).max() <= math.sqrt(16 * 32 * 32 - 1)
  assert np.abs(a).max() < 10  # the clip removes the outlying voxels' leverage
  np.testing.assert_allclose(a, b, atol=1e-3)


def test_empty_folder_and_missing_path(tmp_path):
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="holds no NIfTI files"):
    data.num_examples(mri_cfg(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="holds no NIfTI files"):
    data.num_examples(mri_cfg(tmp_path / "empty", lenient=True))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.num_examples(mri_cfg(tmp_path / "nowhere"))


def test_unknown_name_format_and_modality():
  with pytest.raises(data.DataError, match=r"unknown dataset data.name='demo_xrays': expected one of "
                     r"\[.*'demo_ct'.*'folder'.*\]"):
    data.num_examples(make_cfg("demo_xrays"))
  with pytest.raises(data.DataError, match="data.format='nii': expected one of"):
    data.num_examples(make_cfg("folder", format="nii", modality="ct", path=DEMO))
  with pytest.raises(data.DataError, match="data.modality='mr': expected one of"):
    data.num_examples(make_cfg("folder", format="nifti", modality="mr", path=DEMO))


def test_volume_smaller_than_the_window(tmp_path, warnings_of_data):
  images = copy_cases(tmp_path)
  c = mri_cfg(images, split="all", volume_shape=(64, 32, 32))
  c.mri.window_depth = 64
  with pytest.raises(data.DataError, match=f"{FIRST_CASES[0]}: volume of .* slices .* is smaller than "
                     "the window of 64 slices"):
    data.num_examples(c)
  c.lenient = True
  with pytest.raises(data.DataError, match="every file was skipped.*3 bad file"):
    data.num_examples(c)


def test_splits_that_do_not_exist_are_errors():
  c = make_cfg("demo_mri", volume_shape=(16, 32, 32))
  assert data.num_examples(c, "train") == data.num_examples(c, "all")
  with pytest.raises(data.DataError, match="no split 'test'.*split_fractions is empty"):
    data.num_examples(c, "test")
  c.split_fractions = (0.8, 0.2)
  with pytest.raises(data.DataError, match=r"data.split='test': expected one of \('train', 'val', 'all'\)"):
    data.num_examples(c, "test")


def test_label_values_outside_mask_values(tmp_path):
  root = copy_cases(tmp_path, labels=True).parent
  c = mri_cfg(root / "images", label_path=str(root / "labels"), split="all", mask_values=(0, 1))
  with pytest.raises(data.DataError, match=r"labels/.*label map holds values \[2\] not in data.mask_values"):
    read_all(c)


@pytest.mark.needs_shared
def test_truncated_dicom_slice(shared_data, tmp_path):
  os.makedirs(tmp_path / "dcm")
  for name in ("pydicom_CT_small.dcm", "imageio_dicom_file01_CT.dcm"):
    shutil.copy(shared_data / "ct" / "dicom" / name, tmp_path / "dcm" / name)
  truncate(tmp_path / "dcm" / "imageio_dicom_file01_CT.dcm", 20000)  # pixel data cut
  c = make_cfg("folder", format="dicom", modality="ct", spatial_dims=2, image_size=64, split="all",
               path=str(tmp_path / "dcm"))
  with pytest.raises(data.DataError, match="imageio_dicom_file01_CT.dcm: cannot"):
    read_all(c)
  c.lenient = True
  assert sum(b["image"].shape[0] for b in read_all(c)) == 1


def test_symlink_loops_and_duplicate_links_read_each_file_once(tmp_path):
  """Four PNGs under two folders, a link back to the root, a folder linking to itself and a second link
  to a folder: os.walk(followlinks=True) alone counted 164 examples or never returned."""
  tiles = sorted(os.listdir(os.path.join(DEMO, "pathology", "tiles")))[:4]
  root = tmp_path / "tiles"
  for i, t in enumerate(tiles):
    os.makedirs(root / ("a" if i < 2 else "b"), exist_ok=True)
    shutil.copy(os.path.join(DEMO, "pathology", "tiles", t), root / ("a" if i < 2 else "b") / t)
  os.symlink(root, root / "a" / "back_to_root")
  os.symlink(root / "b", root / "b" / "itself")
  os.symlink(root / "a", root / "c_again")
  os.symlink(root / "a" / tiles[0], root / "b" / "same_file.png")
  found = data.catalog.find_files(str(root), (".png",))
  assert sorted(os.path.basename(os.path.realpath(f)) for f in found) == sorted(tiles)
  c = make_cfg("folder", format="images", modality="path", path=str(root), image_size=32, split="all")
  assert sum(b["image"].shape[0] for b in read_all(c)) == 4


@pytest.mark.parametrize("images,labels,match", [
    (np.zeros((4, 8, 8), np.complex64), None, r"holds complex numbers \(dtype complex64\): expected real-valued"),
    (np.array([["a"] * 8] * 4), None, r"holds strings"),
    (np.zeros((4, 2, 8, 8, 1), np.float32), None, r"shape \(4, 2, 8, 8, 1\): expected \(N, H, W\) or \(N, H, W, C\) "
                                                  r"for 2D data - a volume\?"),
    (np.zeros((4, 64), np.uint8), None, r"shape \(4, 64\): .* it looks flattened"),
    (np.zeros((4, 8, 8, 7), np.uint8), None, r"its last axis \(7\) is not a channel count"),
    (np.zeros((4, 8, 8), np.uint8), np.array(["x"] * 4), r"'labels' holds dtype <U1: expected numeric class labels"),
])
def test_npz_arrays_of_the_wrong_kind_name_the_file(tmp_path, images, labels, match):
  path = tmp_path / "bad.npz"
  arrays = dict(images=images) if labels is None else dict(images=images, labels=labels)
  np.savez(path, **arrays)
  c = make_cfg("folder", format="npz", modality="path", path=str(path), image_size=8, split="all")
  with pytest.raises(data.DataError, match=r"bad\.npz: .*" + match):
    read_all(c)


# ----------------------------------------------------------------------------------------------------
# The second sweep (issue 22): inputs checked where they are read, each error naming the file (and row).


def images_cfg(path, **kw):
  kw.setdefault("image_size", 32)
  kw.setdefault("split", "all")
  return make_cfg("folder", format="images", modality="path", path=str(path), **kw)


def npz_cfg(path, **kw):
  kw.setdefault("image_size", 16)
  kw.setdefault("split", "all")
  return make_cfg("folder", format="npz", modality="xray", path=str(path), **kw)


def count(batches):
  return sum(b["image"].shape[0] for b in batches)


def test_nonfinite_pixels_in_npz_name_the_file_and_row(tmp_path, warnings_of_data):
  images = np.random.default_rng(0).random((4, 16, 16), dtype=np.float32)
  images[2, 3, 4] = np.nan
  images[2, 5, 6] = np.inf
  np.savez(tmp_path / "bad.npz", images=images, labels=np.arange(4))
  with pytest.raises(data.DataError, match=r"bad\.npz:images\[2\]: 2 NaN/Inf pixel\(s\) of 256: expected finite "
                     r"intensities \(set data\.nonfinite='zero'"):
    read_all(npz_cfg(tmp_path / "bad.npz"))
  # Lenient: only that row is skipped, not the file.
  assert count(read_all(npz_cfg(tmp_path / "bad.npz", lenient=True))) == 3
  out = read_all(npz_cfg(tmp_path / "bad.npz", nonfinite="zero"))
  assert count(out) == 4 and all(np.all(np.isfinite(b["image"])) for b in out)
  assert any("bad.npz" in r.getMessage() and "replaced by 0" in r.getMessage() for r in warnings_of_data.records)


def test_nonfinite_pixels_in_a_float_tiff_name_the_file(tmp_path):
  from PIL import Image
  os.makedirs(tmp_path / "tiles")
  good = np.random.default_rng(0).random((32, 32), dtype=np.float32)
  Image.fromarray(good).save(tmp_path / "tiles" / "a.tif")
  bad = good.copy()
  bad[0, :3] = [np.nan, np.inf, -np.inf]
  Image.fromarray(bad).save(tmp_path / "tiles" / "b.tif")
  with pytest.raises(data.DataError, match=r"b\.tif: 3 NaN/Inf pixel\(s\) of 1024: expected finite intensities"):
    read_all(images_cfg(tmp_path / "tiles"))
  assert count(read_all(images_cfg(tmp_path / "tiles", lenient=True))) == 1
  out = read_all(images_cfg(tmp_path / "tiles", nonfinite="zero"))
  assert count(out) == 2 and all(np.all(np.isfinite(b["image"])) for b in out)


@pytest.mark.parametrize("side", [1, 7])
def test_images_smaller_than_the_minimum_are_refused(tmp_path, side):
  from PIL import Image
  os.makedirs(tmp_path / "tiles")
  Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(tmp_path / "tiles" / "a.png")
  Image.fromarray(np.full((side, side, 3), 100, np.uint8)).save(tmp_path / "tiles" / "tiny.png")
  with pytest.raises(data.DataError, match=rf"tiny\.png: an image of {side}x{side} pixels: expected at least "
                     r"16x16 \(data\.min_image_size"):
    read_all(images_cfg(tmp_path / "tiles"))
  assert count(read_all(images_cfg(tmp_path / "tiles", lenient=True))) == 1
  assert count(read_all(images_cfg(tmp_path / "tiles", min_image_size=0))) == 2
  # npz arrays are checked from their headers, before anything is read.
  np.savez(tmp_path / "small.npz", images=np.zeros((4, side, side), np.uint8))
  with pytest.raises(data.DataError, match=rf"small\.npz: array 'images' holds images of {side}x{side} pixels: "
                     r"expected at least 16x16"):
    data.num_examples(npz_cfg(tmp_path / "small.npz", image_size=224))
  # A configured image size below the minimum lowers it: images already that small are what was asked for.
  assert data.num_examples(npz_cfg(tmp_path / "small.npz", image_size=side)) == 4


def test_exif_orientation_is_applied(tmp_path):
  from PIL import Image, ImageOps
  pixels = np.arange(16 * 24 * 3, dtype=np.uint8).reshape(16, 24, 3)
  im = Image.fromarray(pixels)
  exif = im.getexif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
  im.save(tmp_path / "rotated.png", exif=exif)
  got = data.read_image(tmp_path / "rotated.png")
  with Image.open(tmp_path / "rotated.png") as ref:
    expected = np.asarray(ImageOps.exif_transpose(ref))
  assert got.shape == (24, 16, 3)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(got, np.rot90(pixels, -1))


def write_dicom(path, pixels, *, z, series_uid=None, series_number=None, orientation=(1, 0, 0, 0, 1, 0),
                instance=1, study_uid="1.2.826.0.1.3680043.8.498.1"):
  """A minimal CT slice: int16 pixels at `z` mm along the slice normal."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CTImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.StudyInstanceUID = "CT", study_uid
  if series_uid is not None:
    ds.SeriesInstanceUID = series_uid
  if series_number is not None:
    ds.SeriesNumber = series_number
  ds.InstanceNumber = instance
  ds.ImagePositionPatient = (float(z) * np.cross(orientation[:3], orientation[3:])).tolist()
  ds.ImageOrientationPatient = list(orientation)
  ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
  ds.RescaleIntercept, ds.RescaleSlope = 0, 1
  ds.PixelData = pixels.astype(np.int16).tobytes()
  ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("tags,match", [
    (lambda s: dict(series_number=s + 1), r"SeriesNumber 1 and 2"),
    (lambda s: dict(orientation=(1, 0, 0, 0, 1, 0) if s == 0 else (1, 0, 0, 0, 0, -1)), r"ImageOrientationPatient"),
    (lambda s: dict(study_uid=f"1.2.3.{s}"), r"StudyInstanceUID"),
    (lambda s: dict(), r"InstanceNumber 1 is held by"),
])
def test_interleaved_dicom_series_without_uid_are_refused(tmp_path, tags, match):
  """Two series of 3 slices each in one folder, interleaved in position (0, 2, 4 and 1, 3, 5), without a
  SeriesInstanceUID: merged into one 6-slice volume before."""
  folder = tmp_path / "case"
  os.makedirs(folder)
  for s in range(2):
    for k in range(3):
      write_dicom(folder / f"s{s}_{k}.dcm", np.full((8, 8), 100 * s + k), z=2 * k + s, instance=k + 1, **tags(s))
  with pytest.raises(data.DataError, match=r"case: expected one series per folder, found 2 .*" + match):
    data.read_dicom_series(folder)
  # The same slices in two folders are two volumes of 3 slices.
  for s in range(2):
    os.makedirs(tmp_path / "split" / f"series{s}")
    for k in range(3):
      shutil.copy(folder / f"s{s}_{k}.dcm", tmp_path / "split" / f"series{s}" / f"{k}.dcm")
    vol, _ = data.read_dicom_series(tmp_path / "split" / f"series{s}")
    np.testing.assert_array_equal(vol[:, 0, 0], [100 * s, 100 * s + 1, 100 * s + 2])


def test_mixed_dicom_series_are_a_data_error(tmp_path):
  folder = tmp_path / "case"
  os.makedirs(folder)
  for s in range(2):
    write_dicom(folder / f"{s}.dcm", np.zeros((8, 8)), z=s, series_uid=f"1.2.3.{s}")
  c = make_cfg("folder", format="dicom", modality="ct", path=str(tmp_path), split="all", volume_shape=(16, 32, 32))
  with pytest.raises(data.DataError, match=r"case: expected one series per folder, found 2 .*SeriesInstanceUID"):
    data.num_examples(c)


def test_a_dicom_slice_without_rows_is_a_data_error(tmp_path):
  import pydicom
  folder = tmp_path / "case"
  os.makedirs(folder)
  for k in range(2):
    write_dicom(folder / f"{k}.dcm", np.zeros((8, 8)), z=k, series_uid="1.2.3")
  ds = pydicom.dcmread(folder / "1.dcm")
  del ds.Rows
  ds.save_as(folder / "1.dcm")
  with pytest.raises(data.DataError, match=r"1\.dcm: .*Rows"):
    data.read_dicom_series(folder)


def test_four_d_nifti_is_a_data_error(tmp_path):
  import nibabel as nib
  images = copy_cases(tmp_path)
  nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), images / "four_d.nii.gz")
  with pytest.raises(data.DataError, match=r"four_d\.nii\.gz: expected a 3D volume, got a 4D array of shape "
                     r"\(8, 8, 8, 2\) \(a 4D series"):
    data.num_examples(mri_cfg(images, split="all"))


def test_an_empty_image_folder_is_a_data_error(tmp_path):
  os.makedirs(tmp_path / "empty")
  with pytest.raises(data.DataError, match=r"empty'? holds no 2D image files"):
    data.num_examples(images_cfg(tmp_path / "empty"))
  with pytest.raises(data.DataError, match="does not exist"):
    data.num_examples(images_cfg(tmp_path / "nowhere"))


def test_npz_labels_of_another_count_are_a_data_error(tmp_path):
  np.savez(tmp_path / "x.npz", images=np.zeros((4, 16, 16), np.uint8), labels=np.zeros(3, np.int64))
  with pytest.raises(data.DataError, match=r"x\.npz: 'labels' has 3 rows: expected 4 like 'images'"):
    data.num_examples(npz_cfg(tmp_path / "x.npz"))


def test_data_errors_survive_pickling():
  """grain's worker processes send a reader's error to the main process pickled."""
  import pickle
  for e in (data.DataError("/d/x.png", "cannot decode"), data.DataError(None, "data.path is empty")):
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is type(e) and (back.path, back.problem, str(back)) == (e.path, e.problem, str(e))


# ---------------------------------------------------------------------------------------------- text


def text_cfg(path, **kw):
  return make_cfg("folder", format="text", modality="report", path=str(path), split="all", **kw)


@pytest.mark.parametrize("value,kind", [("42", "number"), ('{"a": 1}', "object"), ("true", "boolean"),
                                        ("[1]", "array")])
def test_non_string_report_text_in_json_lines_is_refused(tmp_path, value, kind):
  f = tmp_path / "r.jsonl"
  f.write_text('{"findings": "Clear.", "impression": "Normal."}\n'
               f'{{"findings": {value}, "impression": "Normal."}}\n', encoding="utf-8")
  with pytest.raises(data.DataError, match=rf"r\.jsonl:2: key 'findings' holds a JSON {kind} \(.+\): expected the "
                     r"report text as a JSON string"):
    data.make_source(text_cfg(f))
  assert [r.text for r in data.make_source(text_cfg(f, lenient=True)).records] == ["Clear. Normal."]


def test_a_csv_report_over_the_default_csv_field_limit_is_read(tmp_path):
  f = tmp_path / "r.csv"
  long_report = " ".join(["effusion"] * 20000)  # 179,999 characters: over csv's default 131,072
  f.write_text(f"findings,impression\nClear.,Normal.\n\"{long_report}\",Big.\n", encoding="utf-8")
  got = data.make_source(text_cfg(f)).records
  assert len(got) == 2 and got[1].text == long_report + " Big."


def test_a_text_over_the_text_limit_names_the_line(tmp_path, monkeypatch):
  monkeypatch.setattr(text_io, "MAX_TEXT_CHARS", 1000)
  f = tmp_path / "r.csv"
  f.write_text("findings,impression\nClear.,Normal.\n" + "x " * 600 + ",Big.\n", encoding="utf-8")
  with pytest.raises(data.DataError, match=r"r\.csv:3: a text of 1,204 characters: expected at most 1,000"):
    data.make_source(text_cfg(f))


def test_an_unbalanced_quote_names_the_line_it_opens(tmp_path):
  f = tmp_path / "r.csv"
  f.write_text('findings\nClear lungs.\n"Effusion, left.\nEdema.\nNormal.\n', encoding="utf-8")
  with pytest.raises(data.DataError, match=r"r\.csv:3: malformed CSV row .*unexpected end of data.*quote"):
    data.make_source(text_cfg(f, **{"text.text_columns": ("findings",)}))


@pytest.mark.parametrize("body,match", [
    ("", r"r\.csv:1: empty CSV file: expected a header row"),
    ("findings,impression\n", r"no examples in split 'all'"),
    ("uid,findings\n1,Clear.\n", r"r\.csv:1: no column 'impression'"),
])
def test_empty_and_incomplete_csv_files_are_data_errors(tmp_path, body, match):
  f = tmp_path / "r.csv"
  f.write_text(body, encoding="utf-8")
  with pytest.raises(data.DataError, match=match):
    data.make_source(text_cfg(f))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_lenient_skips_only_the_row_that_is_not_utf8(tmp_path, suffix, warnings_of_data):
  f = tmp_path / f"r{suffix}"
  rows = [f"Report {i} of the lungs.".encode() for i in range(300)]
  rows[150] = b"Opacity, caf\xe9."
  if suffix == ".csv":
    body = b"findings\n" + b"".join(b'"' + r + b'"\n' for r in rows)
  else:
    body = b"".join(b'{"findings": "' + r + b'"}\n' for r in rows)
  f.write_bytes(body)
  cfg = text_cfg(f, **{"text.text_columns": ("findings",)})
  line = 152 if suffix == ".csv" else 151
  with pytest.raises(data.DataError, match=rf"r{suffix}:{line}: byte 0xe9 .* is not UTF-8"):
    data.make_source(cfg)
  cfg.lenient = True
  source = data.make_source(cfg)
  assert len(source) == 299 and "caf" not in " ".join(r.text for r in source.records)
  assert list(source.skips.skipped) == [f"{f}:{line}"]


def test_lenient_pubmed_skips_only_the_line_that_is_not_utf8(tmp_path):
  f = tmp_path / "abstracts.txt"
  f.write_bytes(b"###1\nBACKGROUND\tAsthma is common .\nMETHODS\tWe enrolled caf\xe9 owners .\n"
                b"RESULTS\tIt helped .\n")
  cfg = text_cfg(f, lenient=True, **{"text.layout": "pubmed"})
  assert [r.text for r in data.make_source(cfg).records] == ["Asthma is common .", "It helped ."]


def test_a_five_megabyte_word_does_not_make_tokenizer_training_quadratic(tmp_path, warnings_of_data):
  """One base64-like blob without spaces: WordPiece training took minutes (quadratic in the word's length)."""
  import time
  texts = ["The lungs are clear, no effusion."] * 20 + ["Attachment: " + "Q" * 5_000_000 + " end."]
  start = time.perf_counter()
  tok = tokenization.train_tokenizer(texts, 200)
  assert time.perf_counter() - start < 5
  assert "attachment" in tok.get_vocab() and not any(len(t) > 100 for t in tok.get_vocab())
  assert any("longer than 100 characters" in r.getMessage() for r in warnings_of_data.records)
  # The long word still encodes, as one [UNK] (WordPiece's limit for a word).
  ids = tokenization.encode(tok, [texts[-1]], 8)["tokens"][0]
  assert tokenization.special_ids(tok)["unk"] in ids.tolist()


def test_a_vocab_size_below_the_alphabet_is_refused(tmp_path):
  texts = ["The lungs are clear, no effusion.", "Mild cardiomegaly; small left pleural effusion."]
  with pytest.raises(data.DataError, match=r"data\.text\.vocab_size=6: expected at least \d+ \(the 5 special "
                     r"tokens and \d+ tokens of this corpus's alphabet: its characters"):
    tokenization.train_tokenizer(texts, 6)
  f = tmp_path / "r.csv"
  f.write_text("findings,impression\n" + "".join(f'"{t}",x\n' for t in texts), encoding="utf-8")
  with pytest.raises(data.DataError, match=r"data\.text\.vocab_size=6: expected at least"):
    tokenization.ensure_tokenizer(text_cfg(f, **{"text.vocab_size": 6}), tmp_path)


@pytest.mark.parametrize("body,match", [
    ("[PAD]\n[CLS]\n[SEP]\n[MASK]\nlung\n", r"vocab\.txt: the vocabulary lacks \['\[UNK\]'\]"),
    ("[PAD]\n[UNK]\n[CLS]\n\n[SEP]\n[MASK]\n", r"vocab\.txt:4: empty line"),
    (b"[PAD]\n[UNK]\n\xff\n", r"vocab\.txt:3: byte 0xff"),
    (None, r"vocab\.txt'? does not exist"),
])
def test_a_bad_vocab_txt_is_a_data_error(tmp_path, body, match):
  f = tmp_path / "r.csv"
  f.write_text("findings,impression\nClear.,Normal.\n", encoding="utf-8")
  vocab = tmp_path / "vocab.txt"
  if isinstance(body, bytes):
    vocab.write_bytes(body)
  elif body is not None:
    vocab.write_text(body, encoding="utf-8")
  cfg = text_cfg(f, **{"text.tokenizer": str(vocab)})
  with pytest.raises(data.DataError, match=match):
    tokenization.ensure_tokenizer(cfg, tmp_path)
  with pytest.raises(data.DataError, match=match):
    data.make_eval_iterator(cfg, batch_size=1, process_index=0, process_count=1)
