"""Differential privacy (invcoss_jax/privacy, docs/privacy.md): per-example clipping bounds each example's
influence, the noise has the standard deviation asked, the accountant is dp-accounting's own figure, the
non-DP step is the step as it was, a DP pre-training resumes exactly, options are checked."""

import json
import math
import os

import dp_accounting
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from dp_accounting import pld, rdp

from invcoss_jax import models
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.defaults import base_config, load_config_file
from invcoss_jax.privacy import accounting, dp_sgd, sampling
from invcoss_jax.train import core, optim
from invcoss_jax.train.config import train_config
from invcoss_jax.train.pretrain import mae_loss

IMAGE = (16, 16, 3)


def _tiny_model():
  mc = models.model_config("micro")
  mc.update(dict(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
                 patch_size_2d=(8, 8)))
  return models.build_mae(mc)


@pytest.fixture(scope="module")
def mae():
  model = _tiny_model()
  params = models.init_mae_params(model, jax.random.PRNGKey(0), [IMAGE])
  images = np.random.default_rng(0).random((6, *IMAGE), dtype=np.float32)
  return model, params, {"image": jnp.asarray(images)}


def _norm(tree) -> float:
  return float(optax.tree.norm(tree))


def test_clipping_bounds_each_example_and_removing_one_moves_the_sum_by_at_most_c(mae):
  model, params, batch = mae
  clip = 0.05
  fn = jax.jit(dp_sgd.clipped_gradient_sum(mae_loss(model, 0.75), clip, microbatch_size=2))
  rng = jax.random.PRNGKey(3)
  none = jnp.zeros(6, bool)
  full, (values, norms, _) = fn(params, batch, None, rng, none)
  assert np.all(np.asarray(norms) > clip), "the test needs every example clipped"
  assert np.all(np.isfinite(np.asarray(values)))
  for i in range(6):
    # Example i alone (the others are padding rows): its clipped gradient.
    alone, _ = fn(params, batch, None, rng, ~none.at[i].set(True))
    assert _norm(alone) <= clip * (1 + 1e-5)
    assert _norm(alone) > 0.99 * clip
    # The batch without example i (padding in its row; the others keep their keys: the coupling of the proof).
    without, _ = fn(params, batch, None, rng, none.at[i].set(True))
    diff = jax.tree.map(lambda a, b: a - b, full, without)
    assert _norm(diff) <= clip * (1 + 1e-4)
  # The clipped sum of 6 examples is at most 6 C.
  assert _norm(full) <= 6 * clip * (1 + 1e-5)


def test_noise_has_standard_deviation_sigma_c_over_the_expected_batch():
  """A loss whose gradient is 0: the step's gradient is the noise alone, N(0, (sigma C / B)^2) per entry."""
  spec = accounting.DpSgdPlan(clip_norm=0.5, noise_multiplier=2.0, expected_batch_size=4, max_batch_size=4,
                              microbatch_size=4, dataset_size=100, steps=1, delta=1e-5, accountant="rdp",
                              sampling="poisson", epsilon=math.inf, target_epsilon=math.inf)

  def zero_loss(p, batch, consts, rng):
    return jnp.sum(p["w"]) * 0.0 + 0.0 * jnp.mean(batch["x"]), {}

  grad_fn = jax.jit(dp_sgd.private_gradient(zero_loss, spec))
  params = {"w": jnp.zeros((200_000,), jnp.float32)}
  batch = {"x": jnp.ones((4, 3)), dp_sgd.PADDING_KEY: jnp.array([False, False, False, True])}
  loss, metrics, g = grad_fn(params, batch, None, jax.random.PRNGKey(0))
  g = np.asarray(g["w"], np.float64)
  expected = 2.0 * 0.5 / 4
  # The sample standard deviation of n normals has relative standard error 1 / sqrt(2n) = 0.16 %: 1 % is > 6 of them.
  assert abs(g.std() / expected - 1) < 0.01, g.std()
  assert abs(g.mean()) < 5 * expected / math.sqrt(g.size)
  assert float(metrics["dp_batch_size"]) == 3 and float(metrics["dp_clipped_fraction"]) == 0.0
  # The noise is a function of the step's key alone.
  again = np.asarray(grad_fn(params, batch, None, jax.random.PRNGKey(0))[2]["w"])
  other = np.asarray(grad_fn(params, batch, None, jax.random.PRNGKey(1))[2]["w"])
  np.testing.assert_array_equal(again, g.astype(np.float32))
  assert not np.allclose(other, again)


def test_private_gradient_without_noise_is_the_clipped_mean_over_the_expected_batch(mae):
  model, params, batch = mae
  clip = 0.05
  spec = accounting.DpSgdPlan(clip_norm=clip, noise_multiplier=0.0, expected_batch_size=4, max_batch_size=6,
                              microbatch_size=3, dataset_size=100, steps=1, delta=1e-5, accountant="rdp",
                              sampling="poisson", epsilon=math.inf, target_epsilon=math.inf)
  padding = jnp.array([False] * 5 + [True])
  loss, metrics, g = jax.jit(dp_sgd.private_gradient(mae_loss(model, 0.75), spec))(
      params, {**batch, dp_sgd.PADDING_KEY: padding}, None, jax.random.PRNGKey(5))
  example_rng, _ = jax.random.split(jax.random.PRNGKey(5))
  summed, (values, _, _) = jax.jit(dp_sgd.clipped_gradient_sum(mae_loss(model, 0.75), clip))(
      params, batch, None, example_rng, padding)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b / 4, rtol=1e-4, atol=1e-8), g, summed)
  np.testing.assert_allclose(float(loss), float(np.mean(np.asarray(values)[:5])), rtol=1e-6)
  assert float(metrics["dp_clipped_fraction"]) == 1.0 and float(metrics["dp_batch_size"]) == 5


def test_epsilon_is_dp_accountings_own_figure():
  q, sigma, steps, delta = 0.01, 1.1, 1000, 1e-5
  m = dict(name="dp_sgd", kind="poisson_gaussian", sampling_rate=q, noise_multiplier=sigma, steps=steps,
           dataset_size=10_000, truncated_batch_size=None)
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(sigma)), steps)
  assert accounting.epsilon([m], delta, "rdp") == rdp.RdpAccountant().compose(event).get_epsilon(delta)
  assert accounting.epsilon([m], delta, "pld") == pld.PLDAccountant().compose(event).get_epsilon(delta)
  # Truncated Poisson batches: dp-accounting's TruncatedSubsampledGaussianDpEvent (PLD only).
  t = dict(m, dataset_size=200, sampling_rate=0.05, truncated_batch_size=16, steps=10, noise_multiplier=2.0)
  truncated = dp_accounting.SelfComposedDpEvent(dp_accounting.TruncatedSubsampledGaussianDpEvent(
      dataset_size=200, sampling_probability=0.05, truncated_batch_size=16, noise_multiplier=2.0), 10)
  assert accounting.epsilon([t], delta, "pld") == pld.PLDAccountant().compose(truncated).get_epsilon(delta)
  with pytest.raises(ConfigError, match="privacy.accountant='rdp' cannot account"):
    accounting.epsilon([t], delta, "rdp")


def _dp_config(**privacy):
  c = base_config().privacy
  c.update(dict(accountant="rdp", delta=1e-5, max_batch_size=10_000), **privacy)
  return c


def _plan(privacy, **kw):
  return accounting.plan_dp_sgd(privacy, **{"expected_batch_size": 100, "dataset_size": 10_000, **kw})


def test_calibrated_noise_meets_the_target_and_no_less_noise_would():
  plan = _plan(_dp_config(target_epsilon=2.0), steps=500)
  sigma = plan.noise_multiplier

  def eps(s):
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        0.01, dp_accounting.GaussianDpEvent(s)), 500)
    return rdp.RdpAccountant().compose(event).get_epsilon(1e-5)

  assert plan.epsilon == eps(sigma) <= 2.0
  assert eps(sigma - 2e-3) > 2.0
  assert plan.sampling_rate == 0.01 and plan.max_batch_size == 10_000  # no truncation: rdp can account it
  # jax-privacy's own calibration (the same accountant) agrees.
  from jax_privacy.accounting import accountants, analysis, calibrate
  theirs = calibrate.calibrate_noise_multiplier(
      target_epsilon=2.0, accountant=analysis.DpsgdTrainingAccountant(accountants.RdpAccountantConfig()),
      batch_sizes=100, num_updates=500, num_samples=10_000, target_delta=1e-5)
  assert abs(theirs - sigma) < 2e-3
  # A noise multiplier given directly: its epsilon is reported; delta 0 is 1 / N.
  given = _plan(_dp_config(noise_multiplier=sigma, delta=0.0), steps=500)
  assert given.noise_multiplier == sigma and given.delta == 1e-4


def test_physical_batch_and_truncation():
  c = _dp_config(noise_multiplier=1.0, max_batch_size=0, accountant="pld", microbatch_size=8)
  plan = _plan(c, steps=1, batch_multiple=4)
  assert plan.max_batch_size == 144 and plan.microbatch_size == 8  # 100 + 4 sqrt(99) = 139.8 -> 144
  assert plan.mechanism()["truncated_batch_size"] == 144
  with pytest.raises(ConfigError, match="privacy.accountant='rdp' with privacy.max_batch_size=144"):
    _plan(_dp_config(noise_multiplier=1.0, max_batch_size=0, microbatch_size=8), steps=1, batch_multiple=4)


@pytest.mark.parametrize("change, message", [
    (dict(target_epsilon=-1.0), "privacy.target_epsilon=-1.0"),
    (dict(target_epsilon=8.0, noise_multiplier=1.0), "are both set"),
    (dict(noise_multiplier=1.0, delta=1.5), "privacy.delta=1.5"),
    (dict(noise_multiplier=1.0, clip_norm=0.0), "privacy.clip_norm=0.0"),
    (dict(noise_multiplier=1.0, accountant="moments"), "privacy.accountant='moments'"),
    (dict(noise_multiplier=1.0, sampling="shuffle"), "privacy.sampling='shuffle'"),
    (dict(noise_multiplier=1.0, microbatch_size=-2), "privacy.microbatch_size=-2"),
    (dict(noise_multiplier=1.0, max_batch_size=50), "privacy.max_batch_size=50"),
    (dict(noise_multiplier=1.0, max_batch_size=130, microbatch_size=8), "privacy.max_batch_size=130"),
])
def test_options_are_checked_with_one_line_errors(change, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
    _plan(_dp_config(**change), steps=10)
  assert "\n" not in str(e.value)


def test_grad_accumulation_is_refused_and_off_is_none():
  with pytest.raises(ConfigError, match="train.grad_accum_steps=2 with privacy on"):
    _plan(_dp_config(noise_multiplier=1.0), steps=10, grad_accum_steps=2)
  assert _plan(base_config().privacy, steps=10) is None
  with pytest.raises(ConfigError, match="evaluate.tasks.x.batch_size=100 is larger than the 50 examples"):
    _plan(_dp_config(noise_multiplier=1.0), steps=10, dataset_size=50, batch_option="evaluate.tasks.x.batch_size")


def test_poisson_batches_are_a_function_of_seed_and_step():
  d = base_config().data
  d.name, d.image_size = "demo_xray", 16
  b = sampling.PoissonBatches(d, seed=1, sampling_rate=8 / 1500, max_batch_size=12)
  sizes = [len(b.indices(s)) for s in range(1, 401)]
  assert abs(np.mean(sizes) - 8) < 0.6 and max(sizes) <= 12  # 400 draws of Binomial(1500, q): sd of mean 0.14
  one, again = b.batch(7), b.batch(7)
  jax.tree.map(np.testing.assert_array_equal, one, again)
  n = len(b.indices(7))
  assert one["image"].shape == (12, *IMAGE) and one[dp_sgd.PADDING_KEY].tolist() == [False] * n + [True] * (12 - n)
  assert not np.any(one["image"][n:])
  assert not np.array_equal(b.indices(7), b.indices(8))
  # With vmap chunks of 4 (3 chunks; chunk k holds rows k, k + 3, ...), the examples fill the first chunks.
  chunked = sampling.PoissonBatches(d, seed=1, sampling_rate=8 / 1500, max_batch_size=12, microbatch_size=4)
  assert chunked.rows(6).tolist() == [0, 3, 6, 9, 1, 4]
  mine = chunked.batch(7)
  real = np.flatnonzero(~mine[dp_sgd.PADDING_KEY])
  assert sorted(real.tolist()) == sorted(chunked.rows(n).tolist())
  np.testing.assert_array_equal(mine["image"][chunked.rows(n)], one["image"][:n])


# --- the non-DP step is today's ----------------------------------------------------------------------------


def _reference_make_step(loss_fn, tx, schedule, *, grad_accum_steps=1, mask_updates=None):
  """train.core.make_step before the privacy option (commit fa0391e), verbatim."""

  def step(state, batch, consts=None):
    rng = jax.random.fold_in(state.rng, state.step)
    trainable = state.trainable
    (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch, consts, rng)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    if mask_updates is not None:
      updates = mask_updates(updates, consts)
    new = state.with_trainable(optax.apply_updates(trainable, updates))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step // grad_accum_steps), **extra}
    return new.replace(step=state.step + 1, opt_state=opt_state), metrics

  return step


def test_non_dp_step_is_bit_identical_to_todays(mae):
  model, params, batch = mae
  config = ml_collections.ConfigDict(dict(total_steps=10, train=train_config()))
  config.train.update(global_batch_size=6, base_lr=0.05, warmup_epochs=0)
  tx, schedule = optim.make_optimizer(config.train, optim.run_length(config, None))
  state = core.train_state_init(tx)(params, jax.random.PRNGKey(1))
  loss_fn = mae_loss(model, 0.75)
  new, old = core.make_step(loss_fn, tx, schedule), _reference_make_step(loss_fn, tx, schedule)
  assert str(jax.make_jaxpr(new)(state, batch)) == str(jax.make_jaxpr(old)(state, batch))
  out_new, out_old = jax.jit(new)(state, batch), jax.jit(old)(state, batch)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), out_new, out_old)


# --- DP pre-training ---------------------------------------------------------------------------------------


def _dp_pretrain_config():
  c = load_config_file("configs/xray.py:demo")
  c.model.update(dict(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2))
  c.data.image_size = 16
  c.total_steps = 4
  c.train.global_batch_size = 8
  c.train.stats_after_pretrain = False
  c.checkpoint.every_steps = 100
  c.logging.log_every_steps = 1
  c.mesh.num_devices = 1
  c.privacy.noise_multiplier = 2.0  # the truncated Poisson PLD of a smaller sigma takes seconds to build
  c.privacy.microbatch_size = 4
  return c


def test_dp_pretraining_resumes_exactly_and_writes_its_ledger(tmp_path):
  from invcoss_jax.jobs.pretrain import pretrain
  ref = pretrain(_dp_pretrain_config(), tmp_path / "ref")
  first = pretrain(_dp_pretrain_config(), tmp_path / "resumed", stop_at_step=2)
  assert sorted(first["losses"]) == [1, 2]
  second = pretrain(_dp_pretrain_config(), tmp_path / "resumed")
  assert sorted(second["losses"]) == [3, 4]
  np.testing.assert_array_equal([second["losses"][s] for s in (3, 4)], [ref["losses"][s] for s in (3, 4)])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               second["state"].params, ref["state"].params)
  with open(tmp_path / "ref" / "privacy.json") as f:
    ledger = json.load(f)
  for key in ("epsilon", "delta", "noise_multiplier", "sampling_rate", "steps", "clip_norm", "accountant",
              "mechanisms"):
    assert key in ledger
  assert ledger["steps"] == 4 and ledger["noise_multiplier"] == 2.0 and ledger["delta"] == 1 / 1500
  assert ledger["sampling_rate"] == 8 / 1500 and ledger["accountant"] == "pld"
  assert ledger["epsilon"] == accounting.epsilon(ledger["mechanisms"], ledger["delta"], "pld") < 1.0
  assert ledger["mechanisms"][0]["truncated_batch_size"] == ledger["max_batch_size"] == 20  # 8 + 4 sqrt(8) -> 20
  assert not os.path.exists(tmp_path / "ref" / "statistics.npz")


def test_a_resumed_stage_takes_its_calibration_from_the_ledger():
  c = _dp_config(target_epsilon=2.0)
  plan = _plan(c, steps=500)
  record = dict(noise_multiplier=plan.noise_multiplier, epsilon=plan.epsilon, plan_key=accounting.plan_key(plan))
  record = json.loads(json.dumps(record))
  assert _plan(c, steps=500, previous=record) == plan
  fake = dict(record, noise_multiplier=123.0)
  assert _plan(c, steps=500, previous=fake).noise_multiplier == 123.0
  # Another run length (or any other input): calibrated again.
  assert _plan(c, steps=400, previous=fake).noise_multiplier < 123.0


def test_dp_finetuning_writes_the_tasks_ledger(tmp_path):
  """DP-SGD fine-tuning of the demo pneumonia task from scratch: Poisson batches, per-seed and task ledgers."""
  from invcoss_jax import jobs
  c = load_config_file("configs/evaluate.py:pneumonia")
  c.model.update(dict(width=32, depth=1, num_heads=2))
  c.evaluate.seeds = (0,)
  t = c.evaluate.tasks.pneumonia
  t.data.image_size, t.data.augment = 16, False
  t.steps, t.eval_every, t.lr, t.batch_size, t.eval_batch_size = 3, 3, 1e-3, 16, 256
  c.privacy.noise_multiplier = 2.0
  c.privacy.clip_norm = 0.5
  record = jobs.run(c, tmp_path)
  assert np.isfinite(record["per_seed"]["0"]["auc"])
  with open(tmp_path / "privacy.json") as f:
    ledger = json.load(f)
  with open(tmp_path / "seed_0" / "metrics.json") as f:
    assert json.load(f)["privacy"] == ledger
  assert ledger["steps"] == 3 and ledger["noise_multiplier"] == 2.0 and ledger["clip_norm"] == 0.5
  n = ledger["dataset_size"]
  assert ledger["sampling_rate"] == 16 / n and ledger["delta"] == 1 / n and ledger["epsilon"] > 0
  assert record["privacy"]["epsilon"] == ledger["epsilon"]


@pytest.mark.parametrize("method, order, refused", [
    ("er", ("xray", "ct"), "method 'er' replays a real buffer"),
    ("medcoss", ("xray", "ct"), "method 'medcoss' replays a real buffer"),
    ("invcoss", ("report", "xray"), "the report stage 'report' keeps a real kmeans text buffer"),
])
def test_a_dp_continual_run_refuses_a_real_buffer_unless_told(method, order, refused, tmp_path):
  from invcoss_jax import jobs
  from conftest import tiny_continual_config
  c = tiny_continual_config(method)
  c.continual.order = order
  c.privacy.noise_multiplier = 1.0
  with pytest.raises(ConfigError, match=refused) as e:
    jobs.check_job_options(c)
  assert "config.privacy.allow_real_buffers=True" in str(e.value) and "\n" not in str(e.value)
  c.privacy.allow_real_buffers = True
  with pytest.raises(ConfigError, match="DP-SGD of continual stages is not implemented yet"):
    jobs.check_job_options(c)
  c.privacy.noise_multiplier = 0.0  # privacy off: the run is today's
  jobs.check_job_options(c)


def test_privacy_values_are_checked_when_dp_is_off_too(tmp_path):
  """A typo in config.privacy is refused before any run, DP on or off (one line naming the option)."""
  from invcoss_jax import jobs
  from invcoss_jax.config_checks import ConfigError
  from invcoss_jax.defaults import load_config_file
  c = load_config_file("configs/xray.py:demo")
  c.privacy.accountant = "foo"
  with pytest.raises(ConfigError, match=r"privacy.accountant='foo'"):
    jobs.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # nothing written


def test_tpr_bound_hand_values_limits_and_monotonicity():
  """The (eps, delta)-DP bound on a membership attack's TPR at a given FPR (Kairouz et al. 2015) and its AUC."""
  b = accounting.tpr_bound
  for f in (0.0, 0.01, 0.1, 0.5):
    assert b(0.0, 1e-3, f) == pytest.approx(f + 1e-3)  # eps = 0: TPR <= FPR + delta
    assert b(math.inf, 1e-3, f) == 1.0  # no DP: no bound
  assert b(0.0, 0.0, 1.0) == 1.0
  # Hand values: the first line e^eps FPR + delta at low FPR, the second 1 - e^-eps (1 - delta - FPR) above.
  assert b(1.0, 0.0, 0.01) == pytest.approx(math.e * 0.01)
  assert b(1.0, 1e-5, 0.1) == pytest.approx(math.e * 0.1 + 1e-5)
  assert b(1.0, 0.0, 0.5) == pytest.approx(1 - math.exp(-1) * 0.5)
  assert b(8.0, 1e-5, 0.01) == pytest.approx(1 - math.exp(-8) * (1 - 1e-5 - 0.01))
  assert b(2000.0, 0.0, 0.0) == 0.0 and b(2000.0, 0.0, 0.01) == 1.0  # no overflow
  fprs = np.linspace(0, 1, 51)
  for eps in (0.0, 0.5, 1.0, 8.0):
    curve = [b(eps, 1e-3, f) for f in fprs]
    assert all(x <= y + 1e-12 for x, y in zip(curve, curve[1:]))  # monotone in the FPR
    assert all(f <= t <= 1 for f, t in zip(fprs, curve))
  for f in (0.01, 0.05, 0.1):
    values = [b(eps, 1e-5, f) for eps in (0.0, 0.5, 1.0, 2.0, 8.0, math.inf)]
    assert all(x <= y for x, y in zip(values, values[1:]))  # monotone in epsilon
    assert b(1.0, 1e-4, f) >= b(1.0, 1e-5, f)  # and in delta
  with pytest.raises(ValueError):
    b(-1.0, 0.0, 0.1)
  # The AUC bound: the area under the curve (closed form against the trapezoid rule), 0.5 at eps = 0.
  a = accounting.auc_bound
  assert a(0.0, 0.0) == pytest.approx(0.5) and a(math.inf, 0.0) == 1.0
  grid = np.linspace(0, 1, 20001)
  for eps, delta in ((0.0, 1e-3), (1.0, 1e-5), (3.0, 1 / 1500)):
    assert a(eps, delta) == pytest.approx(np.trapezoid([b(eps, delta, f) for f in grid], grid), abs=1e-6)
  assert a(1.0, 0.0) < a(2.0, 0.0) < a(8.0, 0.0) < 1.0


def test_a_dp_stage_refuses_the_principal_subspace_of_its_images():
  """The DP statistics pass privatises the block and pixel moments, not a covariance of the images: a DP job
  asking for inversion.pixel_components is refused before anything runs; without DP it is accepted."""
  from invcoss_jax import jobs
  from invcoss_jax.defaults import load_config_file
  c = load_config_file("configs/xray.py:demo")
  c.inversion.pixel_statistics = True
  c.inversion.pixel_components = 8
  jobs.check_job_options(c)
  c.privacy.noise_multiplier = 1.0
  c.privacy.stats_clip_norm = 1.0
  c.privacy.stats_noise_multiplier = 1.0
  with pytest.raises(ConfigError, match="pixel_components > 0 keeps the covariance of the images"):
    jobs.check_job_options(c)
  c.inversion.pixel_components = -1
  with pytest.raises(ConfigError, match="pixel_components=-1"):
    jobs.check_job_options(c)
