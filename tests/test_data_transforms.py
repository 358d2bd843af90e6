"""Modality preprocessing on real files: intensity mappings, geometry of windows, references."""

import math
import os

import numpy as np
import pytest
from scipy import ndimage

from invcoss_jax import data

from conftest import make_cfg
from invcoss_jax.data import transforms as T

DEMO = data.DEMO_ROOT
CT_SMALL = os.path.join(DEMO, "ct_organs", "images", "totalseg_ct_small.nii.gz")
CT_SMALL_SEG = os.path.join(DEMO, "ct_organs", "labels", "totalseg_ct_small.nii.gz")
CT_LARGE = os.path.join(DEMO, "ct", "images", "totalseg_ct.nii.gz")
XRAY = os.path.join(DEMO, "xray", "pneumoniamnist_subset.npz")




@pytest.fixture(scope="module")
def ct_small():
  return data.read_nifti(CT_SMALL)


def test_hu_mapping_of_known_values():
  hu = np.array([-3000, -1024, -512, 0, 40, 512, 1024, 3000], np.float32)
  np.testing.assert_allclose(T.hu_to_unit(hu, (-1024, 1024)),
                             [-1, -1, -0.5, 0, 40 / 1024, 0.5, 1, 1], atol=1e-7)
  # A stored offset (HU + 1024 on disk) is removed first; other windows map linearly onto [-1, 1].
  np.testing.assert_allclose(T.hu_to_unit(hu + 1024, (-1024, 1024), hu_offset=-1024),
                             T.hu_to_unit(hu, (-1024, 1024)), atol=1e-7)
  np.testing.assert_allclose(T.hu_to_unit(np.array([-160.0, 40.0, 240.0]), (-160, 240)), [-1, 0, 1])
  with pytest.raises(ValueError, match="hu_clip"):
    T.hu_to_unit(hu, (100, -100))


def test_ct_window_on_the_file_grid_is_the_hu_slab(ct_small):
  """No resampling, no crop, output = window: example k is exactly slices [s_k, s_k+16) / 1024."""
  vol, spacing = ct_small
  seg, _ = data.read_nifti(CT_SMALL_SEG)
  geom = T.VolumeGeometry((16,) + vol.shape[1:], None, 16, 7, crop_fraction=1.0)
  starts = T.window_starts(vol.shape[0], geom)
  assert starts == [0, 7, 14]  # (30 - 16) // 7 + 1
  pre = T.Volume3D(geom, "ct")
  for s in starts:
    out = pre({"image": vol, "spacing": np.array(spacing), "start": s, "mask": seg.astype(np.int32)})
    expect = np.clip(vol[s:s + 16], -1024, 1024) / 1024.0
    np.testing.assert_allclose(out["image"][..., 0], expect, atol=1e-6)
    np.testing.assert_array_equal(out["mask"], seg[s:s + 16].astype(np.int32))
    assert out["image"].dtype == np.float32 and out["mask"].dtype == np.int32


def test_resampling_matches_scipy_zoom(ct_small):
  """One affine map = scipy's zoom with voxel-centre (grid_mode) alignment."""
  vol, spacing = ct_small
  x = T.hu_to_unit(vol, (-1024, 1024))
  target = (2.0, 1.5, 2.5)
  ours = T.resample_to_spacing(x, spacing, target, order=1)
  shape = T.target_grid_shape(x.shape, spacing, target)
  assert shape == (45, 202, 146)
  ref = ndimage.zoom(x, np.array(shape) / np.array(x.shape), order=1, grid_mode=True, mode="nearest")
  assert ours.shape == ref.shape == shape
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  # Nearest-neighbour label maps take only existing values.
  seg, _ = data.read_nifti(CT_SMALL_SEG)
  seg_r = T.resample_to_spacing(seg.astype(np.int32), spacing, target, order=0)
  assert seg_r.dtype == np.int32 and set(np.unique(seg_r)) <= set(np.unique(seg).astype(int))


def test_ct_window_counts_follow_the_target_grid():
  """30 slices of 3 mm -> 90 slices of 1 mm -> (90 - 24) // 12 + 1 = 6 windows; 112 -> 27."""
  c = make_cfg("folder", format="nifti", modality="ct", path=os.path.dirname(CT_SMALL),
               volume_shape=(16, 32, 32))
  assert data.num_examples(c) == 6
  c.path = os.path.dirname(CT_LARGE)
  assert data.num_examples(c) == (112 * 3 - 24) // 12 + 1 == 27
  c.ct.target_spacing = ()  # the file's 3 mm grid: 112 slices
  assert data.num_examples(c) == (112 - 24) // 12 + 1 == 8
  c.volume_mode = "whole"
  assert data.num_examples(c) == 1


def test_ct_windows_after_resampling_match_two_step_reference(ct_small):
  """Window k of the 1 mm grid, central 80 % crop, resize: compared with resample-then-zoom."""
  vol, spacing = ct_small
  geom = T.VolumeGeometry((16, 48, 48), (1.0, 1.0, 1.0), 24, 12, crop_fraction=0.8, crop_min_size=320)
  pre = T.Volume3D(geom, "ct")
  grid = T.resample_to_spacing(T.hu_to_unit(vol, (-1024, 1024)), spacing, (1.0, 1.0, 1.0), order=1)
  assert grid.shape == (90, 303, 366)  # wider than 320: cropped
  s = 36
  window = grid[s:s + 24]
  h, w = grid.shape[1:]
  ch, cw = h * 0.8, w * 0.8
  # Crop bounds fall between voxels: compare on the interior where both interpolations agree closely.
  ref_full = ndimage.zoom(window[:, int(round((h - ch) / 2)):int(round((h + ch) / 2)),
                                 int(round((w - cw) / 2)):int(round((w + cw) / 2))],
                          (16 / 24, 48 / ch, 48 / cw), order=1, grid_mode=True, mode="nearest")
  out = pre({"image": vol, "spacing": np.array(spacing), "start": s})["image"][..., 0]
  assert out.shape == (16, 48, 48) and out.min() >= -1 and out.max() <= 1
  # (The neighbouring window, start 24, is off by 0.05 on average with correlation 0.90.)
  assert np.abs(out - ref_full).mean() < 0.01
  assert np.corrcoef(out.ravel(), ref_full.ravel())[0, 1] > 0.995


def test_mri_percentile_zscore_reference_and_invariances():
  vol, _ = data.read_nifti(os.path.join(DEMO, "mri", "images", sorted(
      os.listdir(os.path.join(DEMO, "mri", "images")))[0]))
  z = T.percentile_zscore(vol, (0.2, 99.8))
  lo, hi = np.percentile(vol, [0.2, 99.8])
  ref = np.clip(vol.astype(np.float64), lo, hi)
  ref = (ref - ref.mean()) / ref.std()
  np.testing.assert_allclose(z, ref, atol=1e-5)
  assert z.dtype == np.float32 and abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4
  # The intensity scale of the file does not matter (the hippocampus outliers are scaled volumes).
  np.testing.assert_allclose(T.percentile_zscore(vol * 1000.0 + 5.0, (0.2, 99.8)), z, atol=1e-4)
  assert np.abs(z).max() <= math.sqrt(z.size - 1)
  np.testing.assert_array_equal(T.percentile_zscore(np.full((4, 5, 6), 7.0), (0.2, 99.8)), 0.0)


def test_mri_window_counts_with_trim():
  c = make_cfg("demo_mri", volume_shape=(16, 32, 32))
  src = data.make_source(c)
  expect = 0
  for h in src.headers:
    d = h.shape[0]
    t = int(round(d * 0.1))
    expect += max(0, (d - 2 * t - 16) // 8 + 1)
  assert len(src) == expect > len(src.headers)
  c.mri.trim_fraction = 0.0
  assert data.num_examples(c) == sum((h.shape[0] - 16) // 8 + 1 for h in src.headers)


def test_xray_eval_at_native_size_is_the_image_over_255():
  with np.load(XRAY) as z:
    raw = z["val_images"][:3]
  pre = T.Natural2D(image_size=28, channels=3)
  for img in raw:
    out = pre({"image": img, "label": np.int64(1)})
    assert out["image"].shape == (28, 28, 3) and out["image"].dtype == np.float32
    for ch in range(3):
      np.testing.assert_allclose(out["image"][..., ch], img / 255.0, atol=1e-6)
    assert out["label"].dtype == np.int32


def test_xray_train_crop_and_flip_stay_in_range_and_vary():
  with np.load(XRAY) as z:
    img = z["train_images"][0]
  pre = T.Natural2D(image_size=32)
  outs = [pre({"image": img}, np.random.default_rng(i))["image"] for i in range(8)]
  for o in outs:
    assert o.shape == (32, 32, 3) and o.min() >= 0.0 and o.max() <= 1.0
  assert len({o.tobytes() for o in outs}) == 8
  # A full-image box and no flip equals the eval resize.
  np.testing.assert_allclose(T.resize_2d(T.to_unit_range(img), (32, 32), "bicubic", box=(0, 0, 28, 28)),
                             T.resize_2d(T.to_unit_range(img), (32, 32), "bicubic"), atol=1e-6)


def test_random_resized_crop_box_obeys_scale_and_ratio():
  rng = np.random.default_rng(0)
  areas, ratios = [], []
  for _ in range(2000):
    top, left, h, w = T.random_resized_crop_box(224, 200, (0.2, 1.0), (3 / 4, 4 / 3), rng)
    assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 200 and h > 0 and w > 0
    areas.append(h * w / (224 * 200))
    ratios.append(w / h)
  areas = np.array(areas)
  assert areas.min() >= 0.19 and areas.max() <= 1.0
  assert np.percentile(ratios, 1) >= 0.7 and np.percentile(ratios, 99) <= 1.4
  # Area is drawn uniformly in [0.2, 1] (then rejected when it does not fit): mean well inside.
  assert 0.45 < areas.mean() < 0.65


def test_random_flip_is_shared_between_image_and_mask():
  a = np.arange(24).reshape(2, 3, 4)
  for seed in range(6):
    img, mask = T.random_flip([a.astype(np.float32), a.copy()], (0, 1, 2), 0.5, np.random.default_rng(seed))
    np.testing.assert_array_equal(img, mask)
  never = T.random_flip([a], (0, 1, 2), 0.0, np.random.default_rng(0))[0]
  np.testing.assert_array_equal(never, a)


def test_pathology_tiles_keep_colour():
  c = make_cfg("demo_path", image_size=48, split="all")
  b = next(data.make_eval_iterator(c, batch_size=8, process_index=0, process_count=1))
  img = b["image"]
  assert img.shape == (8, 48, 48, 3) and img.dtype == np.float32
  assert 0.0 <= img.min() and img.max() <= 1.0
  # H&E is pink/purple: red above green on average (a channel swap would break this).
  assert img[..., 0].mean() > img[..., 1].mean()


def test_preprocessed_passes_values_and_resizes():
  x = np.random.default_rng(0).normal(size=(16, 32, 32, 1)).astype(np.float32)
  np.testing.assert_array_equal(T.Preprocessed((16, 32, 32, 1))({"image": x})["image"], x)
  y = T.Preprocessed((16, 16, 16, 1))({"image": x})["image"]
  ref = ndimage.zoom(x[..., 0], (1, 0.5, 0.5), order=1, grid_mode=True, mode="nearest")
  np.testing.assert_allclose(y[..., 0], ref, atol=1e-5)
  with pytest.raises(ValueError, match="expected"):
    T.Preprocessed((32, 32, 3))({"image": np.zeros((32, 32, 1), np.float32)})


def test_preprocessed_replay_buffers_get_the_stages_crop_and_flip_only_when_augmented(tmp_path):
  """Replay buffers (npz shards of preprocessed images) are augmented like the stage when asked to
  (continual.buffer_augment, as MedCoSS's buffer re-reads its samples through the stage's transform)."""
  from invcoss_jax.data.registry import npz_shards_section
  from invcoss_jax.io_utils import atomic_savez
  images = next(iter(data.make_eval_iterator(make_cfg("demo_xray", image_size=32), batch_size=8)))["image"]
  folder = tmp_path / "buffer"
  folder.mkdir()
  atomic_savez(str(folder / "shard_00000.npz"), images=images)
  stage = make_cfg("demo_xray", image_size=32)
  plain = next(data.make_train_iterator(npz_shards_section(stage, str(folder)), global_batch_size=8, seed=0))["image"]
  # Without augmentation every training example is one of the stored images, unchanged.
  assert all(any(np.array_equal(p, x) for x in images) for p in plain)
  section = npz_shards_section(stage, str(folder), augment=True)
  assert tuple(section.xray.crop_scale) == tuple(stage.xray.crop_scale)
  aug = next(data.make_train_iterator(section, global_batch_size=8, seed=0))["image"]
  assert aug.shape == images.shape and aug.dtype == np.float32
  assert not any(np.array_equal(a, x) for a in aug for x in images)
  assert 0.0 <= aug.min() and aug.max() <= 1.0
  # A grey X-ray stays grey: the crop and flip act on every channel alike.
  np.testing.assert_array_equal(aug[..., 0], aug[..., 2])
  # 3D buffers are mirrored (never cropped): the set of voxel values is kept.
  vol = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype(np.float32)
  out = T.Preprocessed((8, 8, 8, 1), mirror_prob=1.0)({"image": vol}, np.random.default_rng(0))["image"]
  np.testing.assert_array_equal(out, vol[::-1, ::-1, ::-1])
