"""Inversion losses against NumPy references and finite differences; the term registry and objective."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from invcoss_jax.inversion import losses
from invcoss_jax.inversion.config import inversion_config

# Jitted once per shape: op-by-op dispatch compiles every primitive separately (slow on a busy CPU).
l_norm = jax.jit(losses.l_norm)
l_task = jax.jit(losses.l_task)
l_img = jax.jit(losses.l_img, static_argnums=1)
l_rep = jax.jit(losses.l_rep)
mean_pairwise_cosine = jax.jit(losses.mean_pairwise_cosine)


def fd_check(fn, x, direction_seed=0, eps=1e-2, rtol=2e-2):
  """Directional derivative of `fn` at `x`: central differences (float32, step eps) vs jax.grad."""
  x = np.asarray(x, np.float32)
  d = np.random.default_rng(direction_seed).normal(size=x.shape).astype(np.float32)
  f = jax.jit(fn)
  g = np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(x)), np.float64)
  analytic = float(np.sum(g * d))
  numeric = (float(f(jnp.asarray(x + eps * d))) - float(f(jnp.asarray(x - eps * d)))) / (2 * eps)
  np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=1e-3)


# ---------------------------------------------------------------------------------------------- L_norm

def np_l_norm(mean, var, tm, tv):
  return sum(np.linalg.norm((mean[l] - tm[l]).ravel()) + np.linalg.norm((var[l] - tv[l]).ravel())
             for l in range(mean.shape[0]))


def test_l_norm_matches_numpy_and_finite_differences():
  rng = np.random.default_rng(0)
  mean, tm = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  var, tv = rng.uniform(0.1, 2.0, size=(2, 3, 5, 4)).astype(np.float32)
  got = float(l_norm(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(tm), jnp.asarray(tv)))
  np.testing.assert_allclose(got, np_l_norm(mean, var, tm, tv), rtol=1e-5)
  # Plain (not squared) norms: scaling every difference by 2 doubles the loss.
  got2 = float(l_norm(jnp.asarray(tm + 2 * (mean - tm)), jnp.asarray(tv + 2 * (var - tv)),
                             jnp.asarray(tm), jnp.asarray(tv)))
  np.testing.assert_allclose(got2, 2 * got, rtol=1e-5)
  fd_check(lambda m: losses.l_norm(m, jnp.asarray(var), jnp.asarray(tm), jnp.asarray(tv)), mean)
  # At a perfect match the loss is 0 with a finite (zero) gradient, not NaN.
  g = jax.jit(jax.grad(lambda m: losses.l_norm(m, jnp.asarray(tv), jnp.asarray(tm), jnp.asarray(tv))))(tm)
  assert float(l_norm(jnp.asarray(tm), jnp.asarray(tv), jnp.asarray(tm), jnp.asarray(tv))) == 0.0
  assert np.all(np.asarray(g) == 0.0)
  with pytest.raises(ValueError, match="input shape"):
    losses.l_norm(jnp.asarray(mean[:, :2]), jnp.asarray(var), jnp.asarray(tm), jnp.asarray(tv))


# ---------------------------------------------------------------------------------------------- L_task

def test_l_task_matches_numpy_and_finite_differences():
  rng = np.random.default_rng(1)
  pred, target = rng.normal(size=(2, 3, 6, 8)).astype(np.float32)
  mask = (rng.uniform(size=(3, 6)) < 0.75).astype(np.float32)
  per_patch = ((pred - target) ** 2).mean(-1)
  expected = (per_patch * mask).sum() / mask.sum()
  got = float(l_task(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  fd_check(lambda p: losses.l_task(p, jnp.asarray(target), jnp.asarray(mask)), pred)
  # Visible patches do not count.
  pred2 = pred + 10.0 * (1 - mask)[..., None]
  np.testing.assert_allclose(float(l_task(jnp.asarray(pred2), jnp.asarray(target), jnp.asarray(mask))),
                             expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- L_img

def np_tv(x, reduction):
  axes = range(1, x.ndim - 1)
  if reduction == "mean":
    return sum(np.abs(np.diff(x, axis=a)).mean() for a in axes)
  return sum(np.abs(np.diff(x, axis=a)).sum() for a in axes) / x.shape[0]


@pytest.mark.parametrize("shape", [(2, 6, 7, 3), (2, 4, 5, 6, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_l_img_matches_numpy_2d_and_3d(shape, reduction):
  x = np.random.default_rng(2).uniform(size=shape).astype(np.float32)
  got = float(l_img(jnp.asarray(x), reduction))
  np.testing.assert_allclose(got, np_tv(x, reduction), rtol=1e-5)
  if reduction == "sum":
    fd_check(lambda v: losses.l_img(v, reduction), x, eps=1e-3)


def test_l_img_3d_counts_depth_differences():
  x = np.zeros((1, 3, 4, 4, 1), np.float32)
  x[:, 1] = 1.0  # changes along depth only
  assert float(l_img(jnp.asarray(x), "sum")) == pytest.approx(2 * 16)
  assert float(l_img(jnp.asarray(x[:, 0]), "sum")) == 0.0
  with pytest.raises(ValueError, match="img_reduction"):
    losses.l_img(jnp.asarray(x), "median")
  with pytest.raises(ValueError, match="B,H,W,C"):
    losses.l_img(jnp.zeros((3, 4)), "mean")


# ---------------------------------------------------------------------------------------------- L_rep

def np_l_rep(h, pool, valid):
  hn = h / np.linalg.norm(h, axis=1, keepdims=True)
  pn = pool / np.linalg.norm(pool, axis=1, keepdims=True)
  cos = hn @ pn.T
  v = valid.astype(bool)
  return (cos[:, v] ** 2).mean()


def test_l_rep_matches_numpy_and_finite_differences():
  rng = np.random.default_rng(3)
  h = rng.normal(size=(4, 8)).astype(np.float32)
  pool = rng.normal(size=(6, 8)).astype(np.float32)
  valid = np.array([1, 1, 1, 1, 0, 0], np.float32)
  pool[4:] = 1e3  # empty slots hold garbage that must not count
  got = float(l_rep(jnp.asarray(h), jnp.asarray(pool), jnp.asarray(valid)))
  np.testing.assert_allclose(got, np_l_rep(h, pool, valid), rtol=1e-5)
  fd_check(lambda v: losses.l_rep(v, jnp.asarray(pool), jnp.asarray(valid)), h, eps=1e-3)
  assert float(l_rep(jnp.asarray(h), jnp.asarray(pool), jnp.zeros(6))) == 0.0  # empty pool
  # Scale invariance of cosine similarity.
  np.testing.assert_allclose(float(l_rep(jnp.asarray(3 * h), jnp.asarray(pool), jnp.asarray(valid))),
                             got, rtol=1e-5)


def test_mean_pairwise_cosine_matches_numpy():
  f = np.random.default_rng(4).normal(size=(5, 3)).astype(np.float32)
  u = f / np.linalg.norm(f, axis=1, keepdims=True)
  s = u @ u.T
  expected = (s.sum() - np.trace(s)) / 20
  np.testing.assert_allclose(float(mean_pairwise_cosine(jnp.asarray(f))), expected, rtol=1e-5)
  np.testing.assert_allclose(float(mean_pairwise_cosine(jnp.ones((4, 3)))), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- registry

def _fake_ctx():
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.uniform(size=(2, 4, 4, 3)).astype(np.float32))
  m = types.SimpleNamespace(mean=jnp.ones((1, 2, 3)), var=jnp.ones((1, 2, 3)))
  t = types.SimpleNamespace(mean=jnp.zeros((1, 2, 3)), var=jnp.ones((1, 2, 3)))
  return types.SimpleNamespace(images=images, feature_moments=m, target_stats=t)


def test_objective_is_weighted_sum_and_zero_weight_skips_term():
  cfg = inversion_config()
  cfg.loss_weights = ml_collections.ConfigDict(dict(norm=2.0, img=0.5, rep=0.0))  # rep would need a pool
  ctx = _fake_ctx()
  total, terms = losses.objective(ctx, cfg)
  assert set(terms) == {"norm", "img"}
  np.testing.assert_allclose(float(terms["norm"]), np.sqrt(6.0), rtol=1e-6)
  np.testing.assert_allclose(float(terms["img"]), np_tv(np.asarray(ctx.images), "mean"), rtol=1e-5)
  np.testing.assert_allclose(float(total), 2 * float(terms["norm"]) + 0.5 * float(terms["img"]), rtol=1e-6)


def test_registering_a_new_term_needs_no_engine_edit():
  @losses.register_loss_term("test_brightness")
  def brightness(ctx, inv_cfg):
    return jnp.mean(ctx.images) * inv_cfg.get("brightness_scale", 1.0)

  assert "test_brightness" in losses.registered_loss_terms()
  cfg = inversion_config()
  cfg.loss_weights = ml_collections.ConfigDict(dict(img=0.0, test_brightness=3.0))
  ctx = _fake_ctx()
  total, terms = losses.objective(ctx, cfg)
  assert set(terms) == {"test_brightness"}
  np.testing.assert_allclose(float(total), 3 * float(np.mean(np.asarray(ctx.images))), rtol=1e-6)
  with pytest.raises(ValueError, match="already registered"):
    losses.register_loss_term("test_brightness")(lambda ctx, cfg: 0.0)


def test_registry_errors_are_clear():
  cfg = inversion_config()
  cfg.loss_weights = ml_collections.ConfigDict(dict(nrom=1.0))
  with pytest.raises(ValueError, match="'nrom', which is not registered.*'norm'"):
    losses.objective(_fake_ctx(), cfg)
  cfg.loss_weights = ml_collections.ConfigDict(dict(norm=0.0))
  with pytest.raises(ValueError, match="switches every term off"):
    losses.objective(_fake_ctx(), cfg)

  @losses.register_loss_term("test_vector")
  def vector(ctx, inv_cfg):
    return jnp.ones(3)

  cfg.loss_weights = ml_collections.ConfigDict(dict(test_vector=1.0))
  with pytest.raises(ValueError, match="'test_vector' must return a scalar"):
    losses.objective(_fake_ctx(), cfg)


def test_paper_default_weights():
  w = inversion_config().loss_weights
  assert dict(w) == dict(task=1.0, norm=1.0, img=0.1, rep=0.1, pixel=0.0, tv_target=0.0, pixel_pca=0.0)
  assert losses.active_terms(inversion_config()) == dict(task=1.0, norm=1.0, img=0.1, rep=0.1)  # priors opt-in
  assert set(w) <= set(losses.registered_loss_terms())


def test_pixel_prior_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(6, 8, 8, 3)).astype(np.float32)
  mu, var = rng.uniform(size=(8, 8, 3)).astype(np.float32), rng.uniform(size=(8, 8, 3)).astype(np.float32)
  want = np.linalg.norm(x.mean(0) - mu) + np.linalg.norm(x.var(0) - var)
  np.testing.assert_allclose(float(losses.l_pixel(jnp.asarray(x), jnp.asarray(mu), jnp.asarray(var))), want,
                             rtol=1e-5)
  assert float(losses.l_pixel(jnp.asarray(x), jnp.asarray(x.mean(0)), jnp.asarray(x.var(0)))) < 1e-5
  tv = np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()
  np.testing.assert_allclose(float(losses.l_tv_target(jnp.asarray(x), 0.25)), abs(tv - 0.25), rtol=1e-5)
  # The stored TV is the mean of per-image TVs, and that mean equals l_img's batch 'mean' reduction.
  from invcoss_jax.inversion import statistics
  np.testing.assert_allclose(statistics.image_tv(x).mean(), float(losses.l_img(jnp.asarray(x), "mean")), rtol=1e-5)


def _kl_reference(g, mean, basis, var, residual, full, residual_weight=1.0):
  """NumPy: the Gaussian KL of the whitened subspace coordinates (full covariance on the first `full`, one by
  one after) and of the residual energy ratio."""
  z = (g - mean) @ basis.T / np.sqrt(var)
  m = z.mean(0)
  cov = np.cov(z[:, :full], rowvar=False, bias=True).reshape(full, full)
  kl = 0.5 * (np.trace(cov) + m[:full] @ m[:full] - full - np.linalg.slogdet(cov + 1e-4 * np.eye(full))[1])
  s = z[:, full:].var(0) + 1e-4
  kl += 0.5 * np.sum(s + m[full:] ** 2 - 1 - np.log(s))
  r = np.mean(np.sum(((g - mean) - ((g - mean) @ basis.T) @ basis) ** 2, axis=1)) / residual
  return kl + residual_weight * 0.5 * (r - 1 - np.log(r))


def test_principal_subspace_prior_against_numpy_and_its_minimum():
  """l_pixel_pca on pooled grey images equals the NumPy Gaussian KL; a batch drawn from the stored Gaussian
  scores near 0, and a batch with the right total variance but none along the leading direction scores high."""
  from invcoss_jax.inversion import statistics
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(40, 8, 8, 3)).astype(np.float32)
  g = statistics.pooled_grey(x.astype(np.float64), (4, 4))
  want_g = x.astype(np.float64).mean(-1).reshape(40, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(40, 16)
  np.testing.assert_allclose(g, want_g, rtol=1e-12)
  basis = np.linalg.qr(rng.normal(size=(16, 5)))[0].T  # 5 orthonormal rows
  mean, var, residual = rng.uniform(size=16) * 0.5, rng.uniform(0.01, 0.1, size=5), 0.05
  for full, residual_weight in ((32, 1.0), (2, 1.0), (0, 3.0)):
    got = float(losses.l_pixel_pca(jnp.asarray(x), (4, 4), *(jnp.asarray(a, jnp.float32) for a in
                                                               (mean, basis, var, residual)),
                                   full=full, residual_weight=residual_weight))
    want = _kl_reference(g, mean, basis, var, residual, min(full, 5), residual_weight)
    np.testing.assert_allclose(got, want, rtol=2e-4)

  # Images whose pooled grey values are drawn from the stored Gaussian (per 2x2 block constant, grey).
  def as_images(vals):
    im = np.repeat(np.repeat(vals.reshape(-1, 4, 4), 2, axis=1), 2, axis=2)
    return jnp.asarray(np.repeat(im[..., None], 3, axis=-1), jnp.float32)
  n = 4000
  comp = rng.normal(size=(n, 5)) * np.sqrt(var)
  null = np.eye(16) - basis.T @ basis  # residual directions
  resid = rng.normal(size=(n, 16)) @ null * np.sqrt(residual / 11)
  args = [jnp.asarray(a, jnp.float32) for a in (mean, basis, var, residual)]
  drawn = float(losses.l_pixel_pca(as_images(mean + comp @ basis + resid), (4, 4), *args))
  assert drawn < 0.01
  flat = comp.copy()
  flat[:, 0] = 0.0  # no variance along the first component, its energy moved to the residual
  moved = resid * np.sqrt(1 + var[0] / residual)
  assert float(losses.l_pixel_pca(as_images(mean + flat @ basis + moved), (4, 4), *args)) > 1.0


# ---------------------------------------------------------------------------------------------- context

def test_pool_with_batch_writes_the_batch_round_robin():
  from invcoss_jax.inversion.context import InversionContext, rep_features
  cfg = inversion_config()
  pool = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
  feats = -np.ones((3, 2), np.float32)
  for count, slots, filled in [(0, [0, 1, 2], 3), (1, [1, 2, 3], 4), (4, [4, 0, 1], 5)]:
    ctx = InversionContext(images=None, model=None, params=None, target_stats=None, rng=None,
                           pool=jnp.asarray(pool), pool_count=jnp.asarray(count), spec=cfg)
    ctx.__dict__["features"] = jnp.asarray(feats)  # what the encoder would give
    new, valid = (np.asarray(a) for a in ctx.pool_with_batch)
    expected = pool.copy()
    expected[slots] = -1.0
    np.testing.assert_array_equal(new, expected)
    np.testing.assert_array_equal(valid, (np.arange(5) < filled).astype(np.float32))
  tokens = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, 3)).astype(np.float32))
  np.testing.assert_allclose(rep_features(tokens, "mean"), np.asarray(tokens)[:, 1:].mean(1), rtol=1e-6)
  np.testing.assert_array_equal(rep_features(tokens, "cls"), np.asarray(tokens)[:, 0])
  with pytest.raises(ValueError, match="rep_feature"):
    rep_features(tokens, "max")


def test_jitter_rolls_what_the_model_sees_and_leaves_the_pixel_terms_on_the_generated_images():
  """config.inversion.jitter: the model-facing passes read the batch rolled by one offset per spatial axis in
  [-jitter, jitter] (every offset drawn over keys, none outside); the pixel-space terms read `images`."""
  from invcoss_jax.inversion.context import InversionContext
  from invcoss_jax.inversion.engine import jittered
  x = np.random.default_rng(7).normal(size=(2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(jittered(jnp.asarray(x), jax.random.PRNGKey(0), 0)), x)
  roll = jax.jit(jittered, static_argnums=2)
  seen = set()
  for k in range(400):
    y = np.asarray(roll(jnp.asarray(x), jax.random.PRNGKey(k), 2))
    match = [(a, b) for a in range(-4, 5) for b in range(-4, 5)
             if np.array_equal(y, np.roll(x, (a, b), axis=(1, 2)))]
    assert len(match) == 1, "the batch is rolled as a whole, by one offset per axis"
    seen.add(match[0])
  assert seen == {(a, b) for a in range(-2, 3) for b in range(-2, 3)}
  cfg = inversion_config()
  ctx = InversionContext(images=jnp.asarray(x), model=None, params=None, target_stats=None, rng=None, pool=None,
                         pool_count=0, spec=cfg, model_images=jnp.asarray(np.roll(x, 1, axis=1)))
  np.testing.assert_allclose(float(losses.get_loss_term("img")(ctx, cfg)), np_tv(x, "mean"), rtol=1e-5)
  assert not np.array_equal(np.asarray(ctx.model_images), x)
