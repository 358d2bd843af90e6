"""The composite continual step on real demo images (a tiny ViT-MAE): every loss term equals separate model
calls, 2D and 3D sub-batches share one compiled step, PackNet's masks freeze weights bit-exactly, and EWC's
empirical Fisher equals a per-example reference loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invcoss_jax import data as data_lib
from invcoss_jax import models
from invcoss_jax.continual import ewc, step
from invcoss_jax.continual.params import split_params
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.train import core


def tiny_model():
  cfg = models.model_config("micro")
  cfg.update(dict(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
                  patch_size_2d=(8, 8), patch_size_3d=(8, 8, 8)))
  return models.build_mae(cfg)


def demo_images(name, n):
  d = data_lib.data_config()
  d.name, d.image_size, d.volume_shape = name, 16, (8, 16, 16)
  d.ct.target_spacing = ()  # keep the file's 3 mm grid: no costly resampling in a unit test
  return np.asarray(next(iter(data_lib.make_eval_iterator(d, batch_size=n)))["image"], np.float32)


@pytest.fixture(scope="module")
def setup():
  model = tiny_model()
  init = jax.jit(lambda k: models.init_mae_params(model, k, [(16, 16, 3), (8, 16, 16, 1)]))
  params = init(jax.random.key(0))
  # A different "previous" model, so distillation is not trivially zero.
  teacher = jax.tree.map(lambda p, q: p + 0.05 * q, params, init(jax.random.key(1)))
  xray, ct = demo_images("demo_xray", 4), demo_images("demo_ct", 4)
  return model, params, teacher, xray, ct


def _encode(model, params, x, noise):
  tokens = jax.jit(lambda p, x, n: model.apply({"params": p}, x, mask_ratio=0.75, train=False, noise=n,
                                               method=models.MAE.encode)[0])(params, jnp.asarray(x), noise)
  return np.asarray(tokens, np.float64)


def _mae_loss(model, params, x, noise):
  # jitted: eager flax calls would compile every operation on its own
  return float(jax.jit(lambda p, x, n: model.apply({"params": p}, x, mask_ratio=0.75, noise=n)["loss"])(
      params, jnp.asarray(x), noise))


def test_composite_loss_equals_separate_calls_with_mixed_2d_3d(setup):
  model, params, teacher, xray, ct = setup
  # Stage "CT" with an X-ray buffer: a 3D current sub-batch and a 2D buffer sub-batch in one step.
  batch = {"current": (jnp.asarray(ct),), "buffer": (jnp.asarray(xray),)}
  noises = step.draw_noises(jax.random.key(7), batch, model.cfg)
  assert noises["current"][0].shape == (4, 4) and noises["buffer"][0].shape == (4, 4)
  spec = step.LossSpec(mask_ratio=0.75, distill_mask_ratio=0.75, distill_weight=0.7)
  total, terms = jax.jit(lambda p: step.composite_loss(model, spec, p, {}, batch, noises, {"teacher": teacher},
                                                        jax.random.key(3)))(params)
  task = _mae_loss(model, params, ct, noises["current"][0])
  distill = np.mean((_encode(model, params, xray, noises["buffer"][0])
                     - _encode(model, teacher, xray, noises["buffer"][0])) ** 2)
  assert distill > 1e-6
  np.testing.assert_allclose(terms["task"], task, rtol=1e-5)
  np.testing.assert_allclose(terms["distill"], distill, rtol=1e-4)
  np.testing.assert_allclose(total, float(task) + 0.7 * distill, rtol=1e-5)
  # With buffer_mae_weight the buffer also gets its MAE loss, under the distillation mask.
  spec_mae = step.LossSpec(distill_weight=0.7, buffer_mae_weight=0.5)
  total2, terms2 = jax.jit(lambda p: step.composite_loss(model, spec_mae, p, {}, batch, noises, {"teacher": teacher},
                                                          jax.random.key(3)))(params)
  buf_task = _mae_loss(model, params, xray, noises["buffer"][0])
  np.testing.assert_allclose(terms2["buffer_task"], buf_task, rtol=1e-5)
  np.testing.assert_allclose(total2, float(task) + 0.7 * distill + 0.5 * float(buf_task), rtol=1e-5)
  with pytest.raises(ValueError, match="teacher"):
    step.composite_loss(model, spec, params, {}, batch, noises, {"teacher": None}, jax.random.key(3))


def test_joint_sub_batches_are_one_sample_weighted_mean(setup):
  model, params, _, xray, ct = setup
  batch = {"current": (jnp.asarray(xray), jnp.asarray(ct[:2]))}
  noises = step.draw_noises(jax.random.key(8), batch, model.cfg)
  total, terms = jax.jit(lambda p: step.composite_loss(model, step.LossSpec(), p, {}, batch, noises, {},
                                                        jax.random.key(0)))(params)
  l2 = _mae_loss(model, params, xray, noises["current"][0])
  l3 = _mae_loss(model, params, ct[:2], noises["current"][1])
  np.testing.assert_allclose(total, (4 * float(l2) + 2 * float(l3)) / 6, rtol=1e-5)
  assert set(terms) == {"task"}


def test_ewc_and_cassle_terms(setup):
  model, params, teacher, xray, _ = setup
  batch = {"current": (jnp.asarray(xray),)}
  noises = step.draw_noises(jax.random.key(9), batch, model.cfg)
  enc, _ = split_params(params)
  anchor, _ = split_params(teacher)
  fisher = jax.tree.map(lambda a: jnp.full_like(a, 0.3), anchor)
  predictor = step.DistillPredictor(hidden_dim=16)
  aux = {"predictor": predictor.init(jax.random.key(2), jnp.zeros((1, 1, 32)))["params"]}
  spec = step.LossSpec(ewc_weight=2.0, cassle_weight=0.5)
  consts = {"teacher": teacher, "ewc_anchor": anchor, "ewc_fisher": fisher}
  total, terms = jax.jit(lambda p: step.composite_loss(model, spec, p, aux, batch, noises, consts, jax.random.key(0),
                                                        predictor))(params)
  task = _mae_loss(model, params, xray, noises["current"][0])
  student = _encode(model, params, xray, noises["current"][0])
  cassle = np.mean((np.asarray(jax.jit(predictor.apply)({"params": aux["predictor"]}, jnp.asarray(student, jnp.float32)))
                    - _encode(model, teacher, xray, noises["current"][0])) ** 2)
  ewc_ref = 0.5 * sum(float(np.sum(0.3 * (np.asarray(p) - np.asarray(a)) ** 2))
                      for p, a in zip(jax.tree.leaves(enc), jax.tree.leaves(anchor)))
  np.testing.assert_allclose(terms["cassle"], cassle, rtol=1e-4)
  np.testing.assert_allclose(terms["ewc"], ewc_ref, rtol=1e-4)
  np.testing.assert_allclose(total, float(task) + 0.5 * cassle + 2.0 * ewc_ref, rtol=1e-4)


def test_jitted_sharded_step_reports_the_composite_loss_and_masks_updates(setup):
  model, params, teacher, xray, ct = setup
  mesh = mesh_lib.make_mesh({"axes": [("data", -1)]})
  train_cfg = {"base_lr": 1e-2, "global_batch_size": 256, "b1": 0.9, "b2": 0.95, "weight_decay": 0.05,
               "min_lr": 0.0, "no_decay_patterns": ()}
  import ml_collections
  from invcoss_jax.train import optim
  tcfg = ml_collections.ConfigDict(train_cfg)
  tx, schedule = optim.make_optimizer(tcfg, optim.RunLength(total_steps=4, warmup_steps=0, steps_per_epoch=4,
                                                           grad_accum_steps=1))
  mcfg = ml_collections.ConfigDict({"shard_params": False})
  state, shardings = step.create_state(params, {}, tx, jax.random.key(4), mesh, mcfg)
  # Freeze the first encoder block's MLP kernel (as PackNet does for earlier stages' weights).
  trainable = jax.tree.map(lambda p: jnp.ones_like(p), params)
  trainable["encoder"]["block_0"]["fc1"]["kernel"] = jnp.zeros_like(params["encoder"]["block_0"]["fc1"]["kernel"])
  consts = {"teacher": teacher, "ewc_anchor": None, "ewc_fisher": None, "trainable": trainable}
  consts_sh = mesh_lib.state_shardings(consts, mesh, mcfg)
  spec = step.LossSpec()
  fn = core.jit_step(step.make_train_step(model, spec, tx, schedule), shardings, mesh, consts_sh)
  batch = mesh_lib.put_batch(mesh, {"current": (ct,), "buffer": (xray,)})
  rng0 = jnp.array(jax.device_get(state.rng))  # the state is donated to the step
  new, metrics = fn(state, batch, jax.device_put(consts, consts_sh))
  noise_rng, drop_rng = jax.random.split(jax.random.fold_in(rng0, 0))
  host = {"current": (jnp.asarray(ct),), "buffer": (jnp.asarray(xray),)}
  ref, _ = jax.jit(lambda p: step.composite_loss(model, spec, p, {}, host, step.draw_noises(noise_rng, host, model.cfg),
                                                  {"teacher": teacher}, drop_rng))(params)
  np.testing.assert_allclose(metrics["loss"], ref, rtol=1e-5)
  assert int(new.step) == 1 and set(metrics) >= {"loss", "loss_task", "loss_distill", "learning_rate"}
  np.testing.assert_array_equal(new.params["encoder"]["block_0"]["fc1"]["kernel"],
                                params["encoder"]["block_0"]["fc1"]["kernel"])
  assert not np.array_equal(new.params["encoder"]["block_0"]["fc2"]["kernel"],
                            params["encoder"]["block_0"]["fc2"]["kernel"])


def test_empirical_fisher_matches_per_example_loop(setup):
  model, params, _, xray, _ = setup
  x = np.concatenate([xray, xray[:1] * 0.5])
  rng = jax.random.key(11)
  # 4 of the 5 examples (num_examples caps them): batches of 3 and a padded 1.
  fisher, used = ewc.empirical_fisher(model, params, [{"image": x[:2]}, {"image": x[2:]}], mask_ratio=0.75, rng=rng,
                                      num_examples=4, batch_size=3)
  assert used == 4
  enc, dec = split_params(params)

  def loss(e, xi, ni):
    return model.apply({"params": {**dec, **e}}, xi[None], mask_ratio=0.75, noise=ni[None])["loss"]

  ref = None
  grad = jax.jit(jax.grad(loss))
  for i in range(4):
    g = grad(enc, jnp.asarray(x[i]), jax.random.uniform(jax.random.fold_in(rng, i), (4,)))
    sq = jax.tree.map(lambda t: np.asarray(t, np.float64) ** 2, g)
    ref = sq if ref is None else jax.tree.map(np.add, ref, sq)
  for a, b in zip(jax.tree.leaves(fisher), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b / 4, rtol=2e-4, atol=1e-12)
  online = ewc.online_update(fisher, ref, 0.5)
  np.testing.assert_allclose(jax.tree.leaves(online)[0], 0.5 * jax.tree.leaves(fisher)[0] + jax.tree.leaves(ref)[0],
                             rtol=1e-6)
