"""Feature statistics (App. B.2, Eq. 9): exact merging for any batching, across devices, on real images."""

import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invcoss_jax import data as data_lib
from invcoss_jax import models
from invcoss_jax.inversion import statistics
from invcoss_jax.parallel import mesh as mesh_lib


def tiny_mae(image_size=28, patch=7):
  cfg = models.model_config("micro")
  cfg.update(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
             patch_size_2d=(patch, patch))
  model = models.build_mae(cfg)
  init = jax.jit(lambda k: models.init_mae_params(model, k, [(image_size, image_size, 3)]))
  params = init(jax.random.key(0, impl="rbg"))  # rbg initialisers compile ~4x faster than threefry on CPU
  return model, params


def demo_xrays(num: int, size: int = 28) -> np.ndarray:
  """The first `num` real chest X-rays of the embedded demo corpus, preprocessed by the input layer."""
  d = data_lib.data_config()
  d.update(name="demo_xray", image_size=size)
  return next(iter(data_lib.make_eval_iterator(d, batch_size=num)))["image"]


@pytest.fixture(scope="module")
def xrays():
  """40 real chest X-rays (28x28, grey -> 3 channels, [0, 1])."""
  return demo_xrays(40)


@pytest.fixture(scope="module")
def model_and_reference(xrays):
  """A tiny MAE and the NumPy (float64) statistics of its block tokens over all 40 images at once."""
  model, params = tiny_mae()
  blocks, _ = jax.jit(lambda p, x: statistics.encoder_forward(model, p, x))(params, xrays)
  tokens = np.stack([np.asarray(t, np.float64) for t in blocks])  # (blocks, N, T, D)
  return model, params, tokens.mean(axis=1), tokens.var(axis=1)


def _np_moments(x):
  return x.shape[0], x.mean(0), x.var(0)


def test_batch_moments_match_numpy_with_padding_weights():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (9, 5, 4))
  m = statistics.batch_moments(x, axis=0, dtype=np.float64)
  n, mean, var = _np_moments(x)
  np.testing.assert_allclose(m.count, n)
  np.testing.assert_allclose(m.mean, mean, rtol=1e-12)
  np.testing.assert_allclose(m.var, var, rtol=1e-12)
  # Padded rows with weight 0 are ignored (JAX path, float32).
  padded = np.concatenate([x, 100.0 * np.ones((3, 5, 4))]).astype(np.float32)
  w = np.r_[np.ones(9), np.zeros(3)]
  mj = statistics.batch_moments(jnp.asarray(padded), axis=0, weights=jnp.asarray(w))
  assert float(mj.count) == 9
  np.testing.assert_allclose(mj.mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mj.var, var, rtol=1e-5, atol=1e-5)
  # Another axis.
  ma = statistics.batch_moments(x, axis=1, dtype=np.float64)
  np.testing.assert_allclose(ma.var, x.var(1), rtol=1e-12)


@pytest.mark.parametrize("sizes", [[23], [8, 8, 7], [1, 1, 1, 20]])
def test_merge_moments_exact_for_any_batching(sizes):
  rng = np.random.default_rng(1)
  x = rng.normal(-1.0, 2.0, (sum(sizes), 3, 6)) + rng.normal(0, 5, (1, 3, 6))
  _, mean, var = _np_moments(x)
  for dtype, xp, tol in [(np.float64, np, 1e-12), (np.float32, jnp, 2e-5)]:
    total, start = None, 0
    for s in sizes:
      part = xp.asarray(x[start:start + s].astype(dtype))
      m = statistics.batch_moments(part, dtype=dtype)
      total = m if total is None else statistics.merge_moments(total, m)
      start += s
    assert float(total.count) == len(x)
    np.testing.assert_allclose(np.asarray(total.mean), mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(total.var), var, rtol=tol * 10, atol=tol * 10)


def test_merge_moments_with_empty_side_returns_other():
  a = statistics.FeatureStats(count=np.float64(0), mean=np.zeros(3), var=np.zeros(3))
  b = statistics.batch_moments(np.arange(12.0).reshape(4, 3), dtype=np.float64)
  for m in (statistics.merge_moments(a, b), statistics.merge_moments(b, a)):
    np.testing.assert_allclose(m.mean, b.mean)
    np.testing.assert_allclose(m.var, b.var)
    assert m.count == 4


@pytest.mark.parametrize("batch_size", [40, 16, 7])
def test_compute_statistics_equals_numpy_over_whole_dataset(model_and_reference, xrays, batch_size):
  model, params, mean, var = model_and_reference
  batches = ({"image": xrays[i:i + batch_size]} for i in range(0, len(xrays), batch_size))
  stats = statistics.compute_statistics(model, params, batches)
  assert stats.count == len(xrays)
  assert stats.mean.shape == (2, 1 + 16, 32) and stats.mean.dtype == np.float64
  np.testing.assert_allclose(stats.mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats.var, var, rtol=1e-4, atol=1e-5)


def test_compute_statistics_across_four_devices(model_and_reference, xrays):
  model, params, mean, var = model_and_reference
  mesh = mesh_lib.make_mesh({"axes": [("data", 4)]}, devices=jax.devices()[:4])
  # Batches of 10 are padded to 12 (3 rows per device); the last batch is ragged too.
  batches = (xrays[i:i + 10] for i in range(0, 40, 10))
  stats = statistics.compute_statistics(model, params, batches, mesh=mesh)
  assert stats.count == 40
  np.testing.assert_allclose(stats.mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats.var, var, rtol=1e-4, atol=1e-5)
  ragged = statistics.compute_statistics(model, params, [xrays[:9], xrays[9:40]], mesh=mesh)
  np.testing.assert_allclose(ragged.var, var, rtol=1e-4, atol=1e-5)


def test_compute_statistics_rejects_bad_batches(model_and_reference, xrays):
  model, params, *_ = model_and_reference
  with pytest.raises(ValueError, match="empty"):
    statistics.compute_statistics(model, params, [])
  with pytest.raises(ValueError, match="key 'image'"):
    statistics.compute_statistics(model, params, [{"images": xrays}])
  with pytest.raises(ValueError, match="shape"):
    statistics.compute_statistics(model, params, [xrays[0]])


def test_save_load_round_trip_and_size(tmp_path, model_and_reference):
  model, params, mean, var = model_and_reference
  stats = statistics.FeatureStats(count=np.float64(40), mean=mean, var=var)
  path = tmp_path / "statistics.npz"
  file_bytes = statistics.save_statistics(path, stats)
  back = statistics.load_statistics(path)
  assert back.count == 40 and back.mean.dtype == np.float32
  np.testing.assert_array_equal(back.mean, mean.astype(np.float32))
  np.testing.assert_array_equal(back.var, var.astype(np.float32))
  nbytes = statistics.statistics_nbytes(stats)
  assert nbytes == 2 * mean.size * 4 + 8
  assert nbytes < file_bytes < nbytes + 2048  # uncompressed arrays plus the zip/npy headers
  assert [p.name for p in tmp_path.iterdir()] == ["statistics.npz"]  # no temporary left behind
  statistics.check_statistics(back, model, params, (28, 28, 3))
  with pytest.raises(ValueError, match="do not fit the model"):
    statistics.check_statistics(back, model, params, (56, 56, 3))


def test_load_statistics_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    statistics.load_statistics(tmp_path / "missing.npz")
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="bad.npz.*not a readable"):
    statistics.load_statistics(bad)
  keys = tmp_path / "keys.npz"
  np.savez(keys, mean=np.zeros((1, 2, 3)))
  with pytest.raises(ValueError, match="keys.npz.*lacks \\['count', 'var'\\]"):
    statistics.load_statistics(keys)
  shape = tmp_path / "shape.npz"
  np.savez(shape, count=np.int64(3), mean=np.zeros((2, 3)), var=np.zeros((2, 3)))
  with pytest.raises(ValueError, match="shape.npz.*num_blocks"):
    statistics.load_statistics(shape)
  neg = tmp_path / "neg.npz"
  np.savez(neg, count=np.int64(3), mean=np.zeros((1, 2, 3)), var=-np.ones((1, 2, 3)))
  with pytest.raises(ValueError, match="neg.npz.*negative"):
    statistics.load_statistics(neg)
  assert zipfile.is_zipfile(neg) and not os.path.exists(tmp_path / "neg.npz.npz")


def test_centered_rep_feature_has_zero_mean_over_the_data(model_and_reference, xrays):
  """The 'centered_mean' L_rep feature subtracts the data mean exactly as the statistics give it."""
  from invcoss_jax.inversion.context import rep_features
  model, params, mean, var = model_and_reference
  stats = statistics.FeatureStats(count=np.float64(40), mean=mean, var=var)
  blocks, tokens = jax.jit(lambda p, x: statistics.encoder_forward(model, p, x))(params, xrays)
  feats = np.asarray(rep_features(tokens, "centered_mean", last_block=blocks[-1], target_stats=stats))
  assert feats.shape == (40, 32)
  np.testing.assert_allclose(feats.mean(0), 0.0, atol=1e-4)
  assert np.abs(feats).mean() > 1e-2  # not trivially zero
  with pytest.raises(ValueError, match="needs the last block"):
    rep_features(tokens, "centered_mean")


def test_pixel_statistics_equal_numpy_for_any_batching_and_round_trip(tmp_path, model_and_reference, xrays):
  """The input-space statistics (config.inversion.pixel_statistics) merged over ragged batches equal NumPy's
  over the whole set, survive save/load, and are counted in the stored bytes."""
  model, params, *_ = model_and_reference
  x = np.asarray(xrays, np.float64)
  want_tv = np.mean([np.abs(np.diff(im, axis=0)).mean() + np.abs(np.diff(im, axis=1)).mean() for im in x])
  for size in (40, 7):
    stats = statistics.compute_statistics(model, params, (xrays[i:i + size] for i in range(0, len(xrays), size)),
                                          pixel=True)
    np.testing.assert_allclose(stats.pixel["mean"], x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats.pixel["var"], x.var(0), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(stats.pixel["tv"], want_tv, rtol=1e-10)
  path = tmp_path / "statistics.npz"
  statistics.save_statistics(path, stats)
  back = statistics.load_statistics(path)
  np.testing.assert_allclose(back.pixel["mean"], x.mean(0), rtol=1e-6)
  assert statistics.statistics_nbytes(back) == 2 * back.mean.size * 4 + 8 + 4 * (2 * x[0].size + 1)
  assert statistics.load_statistics(path).pixel is not None
  plain = statistics.compute_statistics(model, params, [xrays])
  assert plain.pixel is None


def test_a_stage_without_the_asked_pixel_statistics_is_recomputed(tmp_path, model_and_reference):
  """A stage copied from a run without pixel statistics (the retention benchmark shares stage 1) must get its
  statistics pass again when the inversion asks for them; with them, or without the ask, it is complete."""
  from invcoss_jax.inversion import stage as inv_stage
  from invcoss_jax.inversion.config import inversion_config
  model, params, mean, var = model_and_reference
  cfg = inversion_config()
  assert not inv_stage.has_statistics(tmp_path, cfg)
  statistics.save_statistics(tmp_path / cfg.stats_file, statistics.FeatureStats(count=np.float64(4), mean=mean, var=var))
  assert inv_stage.has_statistics(tmp_path, cfg)
  cfg.pixel_statistics = True
  assert not inv_stage.has_statistics(tmp_path, cfg)
  pixel = dict(mean=np.zeros((4, 4, 3)), var=np.ones((4, 4, 3)), tv=np.float64(0.1))
  statistics.save_statistics(tmp_path / cfg.stats_file,
                             statistics.FeatureStats(count=np.float64(4), mean=mean, var=var, pixel=pixel))
  assert inv_stage.has_statistics(tmp_path, cfg)


def test_principal_subspace_equals_sklearn_pca_for_any_batching_and_round_trips(tmp_path, model_and_reference,
                                                                                 xrays):
  """config.inversion.pixel_components: the K leading components of the pooled grey X-rays, merged over ragged
  batches, are scikit-learn's PCA (components up to sign, variances with the biased 1/N), the residual is the
  variance left outside them; they survive save/load, are counted in the stored bytes, and a file with part of
  them is refused."""
  from sklearn.decomposition import PCA
  model, params, *_ = model_and_reference
  x = np.asarray(xrays, np.float64)  # (40, 28, 28, 3) -> pooled to 14 x 14 by a grid of 16
  g = x.mean(-1).reshape(40, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(40, -1)
  ref = PCA(n_components=6, svd_solver="full").fit(g)
  for size in (40, 7):
    stats = statistics.compute_statistics(model, params, (xrays[i:i + size] for i in range(0, len(xrays), size)),
                                          pixel=True, pixel_components=6, pixel_components_grid=16)
    p = stats.pixel
    assert tuple(p["pca_shape"]) == (14, 14)
    np.testing.assert_allclose(p["pca_mean"], g.mean(0), rtol=1e-10)
    np.testing.assert_allclose(p["pca_var"], ref.explained_variance_ * 39 / 40, rtol=1e-8)
    np.testing.assert_allclose(np.abs(np.sum(p["pca_basis"] * ref.components_, axis=1)), 1.0, atol=1e-8)
    np.testing.assert_allclose(p["pca_residual"], g.var(0).sum() - p["pca_var"].sum(), rtol=1e-8)
  path = tmp_path / "statistics.npz"
  statistics.save_statistics(path, stats)
  back = statistics.load_statistics(path)
  np.testing.assert_allclose(back.pixel["pca_basis"], stats.pixel["pca_basis"], rtol=1e-6, atol=1e-7)
  assert back.pixel["pca_shape"].tolist() == [14, 14]
  assert statistics.statistics_nbytes(back) == (2 * back.mean.size * 4 + 8 + 4 * (2 * x[0].size + 1)
                                                + 4 * (196 + 6 * 196 + 6 + 1) + 8 * 2)
  arrays = dict(np.load(path))
  del arrays["pixel_pca_var"]
  np.savez(tmp_path / "partial.npz", **arrays)
  with pytest.raises(ValueError, match="principal subspace is malformed"):
    statistics.load_statistics(tmp_path / "partial.npz")
  with pytest.raises(ValueError, match="pixel_components_grid=5"):
    statistics.pca_pool_shape((28, 28), 5)  # factor 6 does not divide 28
  with pytest.raises(ValueError, match="at most 4096"):
    statistics.pca_pool_shape((16, 128, 128), 64)


def test_a_stage_without_the_asked_principal_subspace_is_recomputed(tmp_path, model_and_reference):
  """pixel_components asks for more than the pixel moments: a stage whose file lacks them, or holds another
  number of components, gets its statistics pass again."""
  from invcoss_jax.inversion import stage as inv_stage
  from invcoss_jax.inversion.config import inversion_config
  model, params, mean, var = model_and_reference
  cfg = inversion_config()
  cfg.pixel_statistics = True
  pixel = dict(mean=np.zeros((4, 4, 3)), var=np.ones((4, 4, 3)), tv=np.float64(0.1))
  statistics.save_statistics(tmp_path / cfg.stats_file,
                             statistics.FeatureStats(count=np.float64(4), mean=mean, var=var, pixel=pixel))
  cfg.pixel_components = 2
  assert not inv_stage.has_statistics(tmp_path, cfg)
  pixel.update(pca_shape=np.array([4, 4]), pca_mean=np.zeros(16), pca_basis=np.eye(16)[:2], pca_var=np.ones(2),
               pca_residual=np.float64(1.0))
  statistics.save_statistics(tmp_path / cfg.stats_file,
                             statistics.FeatureStats(count=np.float64(4), mean=mean, var=var, pixel=pixel))
  assert inv_stage.has_statistics(tmp_path, cfg)
  cfg.pixel_components = 3
  assert not inv_stage.has_statistics(tmp_path, cfg)
