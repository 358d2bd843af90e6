"""The inversion engine: partitioned optimiser, compiled inner loop, schedules, non-finite guard; the spec."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from invcoss_jax import data as data_lib
from invcoss_jax import models
from invcoss_jax.inversion import engine, losses, statistics
from invcoss_jax.inversion.config import inversion_config


class RecordingWriter:
  """The part of clu's MetricWriter the engine uses."""

  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((int(step), dict(scalars)))


def demo_xrays(num: int, size: int = 28) -> np.ndarray:
  """The first `num` real chest X-rays of the embedded demo corpus, preprocessed by the input layer."""
  d = data_lib.data_config()
  d.update(name="demo_xray", image_size=size)
  return next(iter(data_lib.make_eval_iterator(d, batch_size=num)))["image"]


def tiny_mae(image_shape, patch):
  cfg = models.model_config("micro")
  cfg.update(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
             patch_size_2d=(patch, patch), patch_size_3d=(patch, patch, patch))
  model = models.build_mae(cfg)
  params = jax.jit(lambda k: models.init_mae_params(model, k, [image_shape]))(jax.random.key(0, impl="rbg"))
  return model, params


@pytest.fixture(scope="module")
def trained_xray():
  """A tiny MAE trained for 40 steps on real chest X-rays (the embedded demo corpus at 28x28, 7x7 patches)
  and the statistics of its block tokens over those 256 images."""
  x = demo_xrays(256)
  model, params = tiny_mae((28, 28, 3), 7)
  tx = optax.adam(2e-3)

  @jax.jit
  def train(params, key):
    def step(i, carry):
      p, s = carry
      batch = jax.lax.dynamic_slice_in_dim(jnp.asarray(x), (i % 8) * 32, 32)
      loss_fn = lambda p: model.apply({"params": p}, batch, mask_ratio=0.75, train=True,
                                      rngs={"masking": jax.random.fold_in(key, i)})["loss"]
      g = jax.grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    return jax.lax.fori_loop(0, 40, step, (params, tx.init(params)))[0]

  params = train(params, jax.random.key(1))
  stats = statistics.compute_statistics(model, params, [x[i:i + 128] for i in range(0, 256, 128)])
  return model, params, stats


def small_config(generator="invunet", steps=30, batch_size=8):
  c = inversion_config()
  c.generator = generator
  c.invunet.channels = (8, 16, 32)
  c.schedule_2d.update(batch_size=batch_size, steps=steps, init_steps=steps, latent_dim=16)
  c.lr_generator = 1e-2  # few steps: the paper's 2e-4 needs its 1000
  c.log_every_steps = 5
  return c


def test_partitioned_optimizer_uses_its_learning_rates():
  cfg = inversion_config()
  tx = engine.make_optimizer(cfg)
  params = {"generator": {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}},
            "latents": jnp.zeros((4, 5))}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3), params)
  grads["latents"] = grads["latents"].at[0].set(-7.0)
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  # Adam's first step moves every coordinate by lr * sign(g).
  for leaf in jax.tree.leaves(updates["generator"]):
    np.testing.assert_allclose(np.asarray(leaf), -2e-4, rtol=1e-4)
  z = np.asarray(updates["latents"])
  np.testing.assert_allclose(z[0], 0.05, rtol=1e-4)
  np.testing.assert_allclose(z[1:], -0.05, rtol=1e-4)
  # Direct image optimisation: no generator parameters at all.
  empty = {"generator": {}, "latents": jnp.zeros((2, 3))}
  u, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(jax.tree.map(jnp.ones_like, empty), empty)
  np.testing.assert_allclose(np.asarray(u["latents"]), -0.05, rtol=1e-4)


def test_short_inversion_lowers_the_objective(trained_xray):
  model, params, stats = trained_xray
  cfg = small_config()
  writer = RecordingWriter()
  images, report = engine.synthesize_with_report(model, params, stats, cfg, image_shape=(28, 28, 3),
                                                 rng=jax.random.key(0), num_samples=12, writer=writer)
  assert images.shape == (12, 28, 28, 3) and images.dtype == np.float32
  assert np.all((images >= 0) & (images <= 1)) and np.all(np.isfinite(images))
  assert report["num_batches"] == 2 and report["discarded"] == []
  for b in report["batches"]:
    assert b["fresh_generator"] and b["steps"] == 30  # 2D: a new generator for every batch
    assert b["end"]["total"] < 0.8 * b["start"]["total"]
    assert b["end"]["norm"] < b["start"]["norm"]
    assert set(b["end"]) == {"total", "task", "norm", "img", "rep"}
  # The two batches differ (new seeds), and the features fill the pool.
  assert np.abs(images[:4] - images[8:12]).mean() > 1e-3
  assert report["features"].shape == (12, 32)
  assert -1 <= report["mean_pairwise_cosine"] <= 1
  # Every term is logged every 5 steps, plus the final values of each batch.
  steps = [s for s, _ in writer.scalars]
  assert steps == [0, 5, 10, 15, 20, 25, 30, 30, 35, 40, 45, 50, 55, 60]
  assert set(writer.scalars[0][1]) == {"inversion/" + k for k in ("total", "task", "norm", "img", "rep")}
  # The statistics of the synthetic set are closer to the real ones than those of the first step's noise.
  synth = statistics.compute_statistics(model, params, [images])
  start = report["batches"][0]["start"]["norm"]
  assert float(losses.l_norm(jnp.asarray(synth.mean, jnp.float32), jnp.asarray(synth.var, jnp.float32),
                             jnp.asarray(stats.mean, jnp.float32), jnp.asarray(stats.var, jnp.float32))) < start


@losses.register_loss_term("test_nan_on_first_attempt")
def _nan_on_first_attempt(ctx, inv_cfg):
  return jnp.where(ctx.attempt == 0, jnp.nan, 0.0) + 0.0 * jnp.mean(ctx.images)


def test_nonfinite_batch_is_discarded_and_regenerated(trained_xray, caplog):
  model, params, stats = trained_xray
  cfg = small_config(generator="none", steps=3)
  cfg.loss_weights = ml_collections.ConfigDict(dict(norm=1.0, test_nan_on_first_attempt=1.0))
  images, report = engine.synthesize_with_report(model, params, stats, cfg, image_shape=(28, 28, 3),
                                                 rng=jax.random.key(3), num_samples=10)
  assert images.shape == (10, 28, 28, 3) and np.all(np.isfinite(images))
  assert report["discarded"] == [dict(batch=0, attempt=0), dict(batch=1, attempt=0)]
  assert [b["attempts"] for b in report["batches"]] == [2, 2]
  assert "non-finite" in caplog.text
  cfg.max_retries = 0
  with pytest.raises(FloatingPointError, match="max_retries=0"):
    engine.synthesize(model, params, stats, cfg, image_shape=(28, 28, 3), rng=jax.random.key(3), num_samples=4)


def test_3d_schedule_longer_first_batch_and_generator_reinit():
  model, params = tiny_mae((4, 8, 8, 1), 4)
  vols = np.asarray(jax.random.normal(jax.random.key(5), (6, 4, 8, 8, 1)))
  stats = statistics.compute_statistics(model, params, [vols])
  cfg = inversion_config()
  cfg.invunet.channels = (4, 8)
  cfg.schedule_3d.update(batch_size=2, steps=2, init_steps=4, latent_dim=8, reinit_every=2)
  cfg.loss_weights.task = 0.0
  images, report = engine.synthesize_with_report(model, params, stats, cfg, image_shape=(4, 8, 8, 1),
                                                 rng=jax.random.key(0), num_samples=5)
  assert images.shape == (5, 4, 8, 8, 1) and np.all(np.abs(images) < 1)  # tanh in 3D
  assert [b["steps"] for b in report["batches"]] == [4, 2, 4]
  assert [b["fresh_generator"] for b in report["batches"]] == [True, False, True]
  assert "task" not in report["end"]


def test_bad_inputs_raise(trained_xray):
  model, params, stats = trained_xray
  cfg = small_config()
  with pytest.raises(ValueError, match="do not fit the model"):
    engine.synthesize(model, params, stats, cfg, image_shape=(56, 56, 3), rng=jax.random.key(0), num_samples=2)
  cfg.generator = "gan"
  with pytest.raises(ValueError, match="generator must be one of"):
    engine.synthesize(model, params, stats, cfg, image_shape=(28, 28, 3), rng=jax.random.key(0), num_samples=2)
  with pytest.raises(ValueError, match="num_samples"):
    engine.synthesize(model, params, stats, small_config(), image_shape=(28, 28, 3), rng=jax.random.key(0),
                      num_samples=0)


def test_grey_prior_generates_one_channel_repeated_and_auto_follows_the_modality():
  cfg = inversion_config()
  cfg.invunet.channels = (8, 16)
  assert engine.resolve_grey(cfg, "xray").grey == "yes"
  assert engine.resolve_grey(cfg, "path").grey == "no"
  cfg.grey = "yes"
  gen = engine.build_generator(cfg, (16, 16, 3))
  opt_vars, state = engine.init_variables(gen, (16, 16, 3), 4, 16, jax.random.key(0))
  images, _ = engine.render(gen, "sigmoid", opt_vars, state)
  assert images.shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(images[..., 0], images[..., 1])
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  assert float(jnp.std(images[..., 0])) > 0
  cfg.grey = "no"
  gen = engine.build_generator(cfg, (16, 16, 3))
  opt_vars, state = engine.init_variables(gen, (16, 16, 3), 4, 16, jax.random.key(0))
  images, _ = engine.render(gen, "sigmoid", opt_vars, state)
  assert float(jnp.max(jnp.abs(images[..., 0] - images[..., 1]))) > 1e-3
  cfg.grey = "maybe"
  with pytest.raises(ValueError, match="grey"):
    engine.build_generator(cfg, (16, 16, 3))


def test_realism_priors_pull_the_batch_towards_the_real_pixel_statistics(trained_xray):
  """With the opt-in pixel statistics, the 'pixel' and 'tv_target' terms move the synthetic batch's mean image,
  pixel variance and total variation towards the real X-rays' (what the paper's terms alone leave far off), and
  asking for them without stored pixel statistics is a clear error."""
  from invcoss_jax.inversion.config import use_realism_priors
  model, params, stats = trained_xray
  x = np.asarray(demo_xrays(256), np.float64)
  pm, tv = statistics.pixel_moments(x)
  with_pixel = stats.replace(pixel=dict(mean=pm.mean, var=pm.var, tv=tv / len(x)))
  cfg = small_config(steps=60, batch_size=16)
  with pytest.raises(ValueError, match="pixel_statistics"):
    engine.synthesize_with_report(model, params, stats, use_realism_priors(small_config()), image_shape=(28, 28, 3),
                                  rng=jax.random.key(0), num_samples=4)

  def errors(c):
    images = engine.synthesize(model, params, with_pixel, c, image_shape=(28, 28, 3), rng=jax.random.key(3),
                               num_samples=16).astype(np.float64)
    return (np.linalg.norm(images.mean(0) - pm.mean), np.linalg.norm(images.var(0) - pm.var),
            abs(statistics.image_tv(images).mean() - tv / len(x)))

  paper = errors(cfg)
  priors = errors(use_realism_priors(small_config(steps=60, batch_size=16)))
  assert priors[0] < 0.5 * paper[0] and priors[1] < paper[1] and priors[2] < paper[2]


# ---------------------------------------------------------------------------------------------- the spec

def test_every_inversion_option_is_on_exactly_one_side_of_the_spec():
  """config.inversion is read once into an InversionSpec: each key a field of the program part (what the
  compiled program depends on) or of the host part, never both; any other key is refused, naming it."""
  from invcoss_jax.config_checks import ConfigError
  from invcoss_jax.inversion import config as inv_config
  program, host = set(inv_config.PROGRAM_OPTIONS), set(inv_config.HOST_OPTIONS)
  assert not program & host
  assert set(inversion_config().keys()) == program | host
  spec = inv_config.inversion_spec(inversion_config())
  assert spec.host.schedule_2d.batch_size == 320 and spec.program.loss_weights == (
      ("img", 0.1), ("norm", 1.0), ("pixel", 0.0), ("pixel_pca", 0.0), ("rep", 0.1), ("task", 1.0),
      ("tv_target", 0.0))
  assert inv_config.inversion_spec(spec) is spec
  for section in ("", "invunet.", "schedule_2d."):
    c = inversion_config()
    (c[section.rstrip(".")] if section else c).nosuch = 1
    with pytest.raises(ConfigError, match=rf"^config\.inversion\.{section}nosuch is not an option of the inversion"):
      inv_config.inversion_spec(c)
  c = inversion_config()
  c.buffer_fraction = 0.05  # moved to config.continual.buffer_fraction
  with pytest.raises(ConfigError, match=r"config\.inversion\.buffer_fraction is not an option"):
    inv_config.inversion_spec(c)


@losses.register_loss_term("test_scaled_brightness", options=("test_brightness_scale",))
def _scaled_brightness(ctx, spec):
  return jnp.mean(ctx.images) * spec.test_brightness_scale


def test_the_compile_key_is_the_program_part_of_the_spec():
  """A host option changes nothing the compiled program reads (same key, no recompilation); a program option
  or a declared term option gives another key. This replaced a hand-kept list of host options."""
  from invcoss_jax.inversion.config import inversion_spec
  base = inversion_spec(inversion_config())
  host_changes = dict(inner_loop="compiled", max_retries=7, num_samples=5, shard_size=3, log_every_steps=2,
                      grid_size=4, stats_batch_size=8, pixel_statistics=True, stats_file="x.npz", pixel_components=8,
                      buffer_fractions=(0.5,), pool_size=9)
  for key, value in [*host_changes.items(), ("schedule_2d.steps", 3), ("schedule_3d.batch_size", 2)]:
    c = inversion_config()
    c.update_from_flattened_dict({key: value})
    spec = inversion_spec(c)
    assert spec.host != base.host and spec.program == base.program and hash(spec.program) == hash(base.program), key
  program_changes = [("lr_generator", 1e-3), ("lr_latents", 0.1), ("adam_b1", 0.5), ("jitter", 2),
                     ("loss_weights.rep", 0.0), ("task_mask_ratio", 0.5), ("invunet.channels", (8, 16)),
                     ("cmi.ngf", 4), ("grey", "no"), ("generator", "cmi"), ("output_activation", "tanh"),
                     ("img_reduction", "sum"), ("rep_feature", "cls"), ("pixel_components_grid", 16)]
  for key, value in program_changes:
    c = inversion_config()
    c.update_from_flattened_dict({key: value})
    spec = inversion_spec(c)
    assert spec.program != base.program and spec.host == base.host, key
  # A registered term's own option: allowed once declared, a program field, read as an attribute.
  c = inversion_config()
  c.loss_weights.test_scaled_brightness = 1.0
  c.test_brightness_scale = 2.0
  spec = inversion_spec(c)
  assert spec.program.test_brightness_scale == 2.0 and spec.program.get("test_brightness_scale") == 2.0
  assert spec.program.get("nothing", 3) == 3
  c.test_brightness_scale = 4.0
  assert inversion_spec(c).program != spec.program
  c.loss_weights = ml_collections.ConfigDict(dict(test_scaled_brightness=1.0))
  total, _ = losses.objective(types.SimpleNamespace(images=jnp.full((2, 4, 4, 3), 0.5)), inversion_spec(c).program)
  assert float(total) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="built-in option"):
    losses.register_loss_term("test_bad_option", options=("jitter",))(lambda ctx, spec: 0.0)


def test_a_host_option_reuses_the_compiled_inversion(trained_xray):
  """Two inversions that differ only in host options (log interval, retries, pool size) share one compiled
  program; a program option (the jitter) compiles another."""
  model, params, stats = trained_xray
  cfg = small_config(steps=2, batch_size=4)
  engine.synthesize(model, params, stats, cfg, image_shape=(28, 28, 3), rng=jax.random.key(0), num_samples=4)
  before = list(engine._COMPILED)
  cfg.log_every_steps, cfg.max_retries, cfg.pool_size, cfg.grid_size = 1, 5, 8, 4
  engine.synthesize(model, params, stats, cfg, image_shape=(28, 28, 3), rng=jax.random.key(0), num_samples=4)
  assert list(engine._COMPILED) == before
  cfg.jitter = 1
  engine.synthesize(model, params, stats, cfg, image_shape=(28, 28, 3), rng=jax.random.key(0), num_samples=4)
  assert [k for k in engine._COMPILED if k not in before]


def test_the_principal_subspace_prior_gives_the_batch_the_real_images_leading_directions(trained_xray):
  """With the stage's principal subspace of grey X-rays kept (pixel_components), the 'pixel_pca' term brings
  the synthetic batch's variance along the leading components towards the real images' (the realism priors
  alone leave it far off) and its KL down; asking for it without the subspace, or on another grid, is a clear
  error."""
  from invcoss_jax.config_checks import ConfigError
  from invcoss_jax.inversion.config import use_realism_priors
  model, params, stats = trained_xray
  x = np.asarray(demo_xrays(256), np.float64)
  pm, tv = statistics.pixel_moments(x)
  g = statistics.pooled_grey(x, (14, 14))
  pca = statistics.principal_subspace(g.sum(0), g.T @ g, len(x), 6, (14, 14))
  plain = stats.replace(pixel=dict(mean=pm.mean, var=pm.var, tv=tv / len(x)))
  with_pca = stats.replace(pixel=dict(mean=pm.mean, var=pm.var, tv=tv / len(x), **pca))

  def config(weight):
    c = use_realism_priors(small_config(steps=60, batch_size=16))
    c.loss_weights.pixel_pca = weight
    c.pixel_components_grid = 16  # 28 -> 14 x 14
    return c

  with pytest.raises(ConfigError, match="pixel_components > 0"):
    engine.synthesize(model, params, plain, config(10.0), image_shape=(28, 28, 3), rng=jax.random.key(0),
                      num_samples=4)
  other_grid = config(10.0)
  other_grid.pixel_components_grid = 7
  with pytest.raises(ConfigError, match="use the grid of its statistics pass"):
    engine.synthesize(model, params, with_pca, other_grid, image_shape=(28, 28, 3), rng=jax.random.key(0),
                      num_samples=4)

  def leading_variance_ratio(weight):
    images = engine.synthesize(model, params, with_pca, config(weight), image_shape=(28, 28, 3),
                               rng=jax.random.key(3), num_samples=16).astype(np.float64)
    proj = (statistics.pooled_grey(images, (14, 14)) - pca["pca_mean"]) @ pca["pca_basis"].T
    return proj.var(0)[:3] / pca["pca_var"][:3]

  without, with_prior = leading_variance_ratio(0.0), leading_variance_ratio(10.0)
  assert np.all(np.abs(np.log(with_prior)) < np.abs(np.log(without))), (without, with_prior)
