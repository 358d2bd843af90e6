"""Bad input on real files: a clear error naming the file and what was expected, or (lenient) a logged
skip and a count."""

import logging
import math
import os
import shutil

import numpy as np
import pytest

from invcoss_jax import data

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
