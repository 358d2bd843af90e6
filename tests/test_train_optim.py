"""AdamW, its weight-decay exclusions, the warm-up/cosine schedule and gradient accumulation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from invcoss_jax import models
from invcoss_jax.train import optim
from invcoss_jax.train.config import train_config


def _config(total_steps=-1, **train):
  c = ml_collections.ConfigDict()
  c.total_steps = total_steps
  c.train = train_config()
  c.train.update(train)
  return c


def _mae_reference_lr(step, peak, min_lr, warmup, total):
  """MAE's util/lr_sched.adjust_learning_rate, per update instead of per fractional epoch."""
  if step < warmup:
    return peak * step / warmup
  return min_lr + (peak - min_lr) * 0.5 * (1.0 + np.cos(np.pi * (step - warmup) / (total - warmup)))


def test_paper_run_length_and_peak_lr():
  c = _config()  # defaults: batch 512, 300 epochs, 40 warm-up, blr 1.5e-4
  length = optim.run_length(c, num_examples=512 * 100 + 7)
  assert length.steps_per_epoch == 100 and length.total_steps == 30000 and length.warmup_steps == 4000
  assert optim.peak_learning_rate(c.train) == pytest.approx(1.5e-4 * 2)


def test_capped_run_keeps_the_warmup_fraction():
  length = optim.run_length(_config(total_steps=300), num_examples=10)
  assert (length.total_steps, length.warmup_steps) == (300, 40)
  assert optim.run_length(_config(total_steps=3), num_examples=10).warmup_steps == 0


@pytest.mark.parametrize("min_lr", [0.0, 1e-5])
def test_schedule_matches_the_mae_formula(min_lr):
  c = _config(total_steps=120, global_batch_size=64, base_lr=1e-3, min_lr=min_lr)
  length = optim.run_length(c, num_examples=None)
  sched = optim.make_schedule(c.train, length)
  peak = 1e-3 * 64 / 256
  got = np.array([float(sched(s)) for s in range(length.total_steps + 1)])
  want = np.array([_mae_reference_lr(s, peak, min_lr, length.warmup_steps, length.total_steps)
                   for s in range(length.total_steps + 1)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  assert got[0] == 0.0 and got.argmax() == length.warmup_steps == 16


def test_bad_run_options_raise():
  with pytest.raises(ValueError, match="config.train.grad_accum_steps"):
    optim.run_length(_config(grad_accum_steps=3, global_batch_size=16), 100)
  with pytest.raises(ValueError, match="config.train.grad_accum_steps must be >= 1"):
    optim.run_length(_config(grad_accum_steps=0), 100)
  with pytest.raises(ValueError, match="number of examples is unknown"):
    optim.run_length(_config(), None)
  with pytest.raises(ValueError, match="the run has no steps"):
    optim.run_length(_config(num_epochs=0), 100)


@pytest.fixture(scope="module")
def mae_params():
  mc = models.model_config("micro")
  mc.pos_embed = "learned"
  mc.learned_pos_grid_2d = (2, 2)
  mc.layer_scale_init = 1e-3
  model = models.build_mae(mc)
  return jax.jit(lambda r: models.init_mae_params(model, r, [(32, 32, 3)]))(jax.random.PRNGKey(0))


def test_weight_decay_mask_on_the_mae_parameter_tree(mae_params):
  mask = optim.weight_decay_mask(mae_params, train_config().no_decay_patterns)
  flat = {optim.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  shapes = {optim.path_name(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(mae_params)[0]}
  no_decay = {n for n, v in flat.items() if not v}
  for name in no_decay:
    assert (len(shapes[name]) <= 1 or any(k in name for k in ("cls_token", "pos_embed", "mask_token"))), name
  for expected in ("cls_token", "mask_token", "pos_embed_2d", "decoder_pos_embed_2d",
                   "encoder/block_0/norm1/scale", "encoder/block_0/fc1/bias", "encoder/block_0/ls1/gamma"):
    assert expected in no_decay, expected
  decayed = {n for n, v in flat.items() if v}
  assert {"encoder/block_0/fc1/kernel", "patch_embed_2d/kernel", "decoder_pred_2d/kernel",
          "encoder/block_0/attn/query/kernel"} <= decayed
  assert all(len(shapes[n]) >= 2 for n in decayed)


def test_adamw_decays_only_the_masked_parameters(mae_params):
  c = _config(total_steps=10, global_batch_size=256, base_lr=1e-2, weight_decay=0.5)
  length = optim.run_length(c, None)
  tx, sched = optim.make_optimizer(c.train, length)
  opt_state = tx.init(mae_params)
  zeros = jax.tree.map(jnp.zeros_like, mae_params)
  update = jax.jit(tx.update)
  for _ in range(3):  # the third update uses the schedule at count 2
    updates, opt_state = update(zeros, opt_state, mae_params)
  lr = float(sched(2))
  assert lr > 0
  mask = optim.weight_decay_mask(mae_params, c.train.no_decay_patterns)

  def check(p, u, m):
    # With zero gradients AdamW's update is -lr * wd * p where decay applies, else nothing.
    want = -lr * 0.5 * np.asarray(p) if m else np.zeros(p.shape, np.float32)
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-5, atol=1e-12)

  jax.tree.map(check, mae_params, updates, mask)


def test_gradient_accumulation_averages_micro_batches():
  """k micro-batch gradients through MultiSteps == one update with their mean."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
           for _ in range(3)]
  acc = _config(total_steps=4, global_batch_size=48, base_lr=0.1, grad_accum_steps=3, warmup_epochs=0)
  one = _config(total_steps=4, global_batch_size=48, base_lr=0.1, grad_accum_steps=1, warmup_epochs=0)
  tx_acc, _ = optim.make_optimizer(acc.train, optim.run_length(acc, None))
  tx_one, _ = optim.make_optimizer(one.train, optim.run_length(one, None))
  assert isinstance(tx_acc, optax.MultiSteps) or hasattr(tx_acc, "has_updated")
  s_acc, s_one = tx_acc.init(params), tx_one.init(params)
  p_acc = params
  update_acc = jax.jit(tx_acc.update)
  for i, g in enumerate(grads):
    u, s_acc = update_acc(g, s_acc, p_acc)
    p_acc = optax.apply_updates(p_acc, u)
    if i < 2:  # nothing is applied before the k-th micro-batch
      jax.tree.map(np.testing.assert_array_equal, p_acc, params)
  mean = jax.tree.map(lambda *g: sum(g) / 3, *grads)
  u, s_one = tx_one.update(mean, s_one, params)
  p_one = optax.apply_updates(params, u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p_acc, p_one)
  assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), p_one, params))
