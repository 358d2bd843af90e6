"""Membership inference: AUC, bootstrap interval and TPR at low FPR against sklearn; per-image MAE losses;
the attack on real demo X-rays is ~0.5 for a model that never saw either split and clearly above 0.5 for a
tiny MAE overfitted on its training split."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from invcoss_jax import data as data_lib
from invcoss_jax import models
from invcoss_jax.audit import forward, membership
from invcoss_jax.jobs.audit import example_keys

IMAGE = 32
N = 32  # members, unseen training images, held-out images: N each
STEPS = 1200


def scores_with_ties(seed, shift):
  rng = np.random.default_rng(seed)
  m = np.round(rng.normal(size=60) + shift, 1)  # rounding makes ties within and across groups
  n = np.round(rng.normal(size=45), 1)
  return m, n


@pytest.mark.parametrize("shift", [0.0, 0.7, -1.5])
def test_auc_matches_sklearn_with_ties(shift):
  m, n = scores_with_ties(0, shift)
  expected = roc_auc_score(np.r_[np.ones(m.size), np.zeros(n.size)], np.r_[m, n])
  assert membership.attack_auc(m, n) == pytest.approx(expected, abs=1e-12)


def test_tpr_at_fpr_matches_sklearn_roc_curve():
  m, n = scores_with_ties(1, 0.8)
  fpr, tpr, _ = roc_curve(np.r_[np.ones(m.size), np.zeros(n.size)], np.r_[m, n], drop_intermediate=False)
  for target in (0.0, 0.01, 0.05, 0.1, 0.5, 1.0):
    assert membership.tpr_at_fpr(m, n, target) == pytest.approx(tpr[fpr <= target].max(), abs=1e-12)


def test_bootstrap_interval_covers_the_auc_narrows_with_data_and_is_seeded():
  m, n = scores_with_ties(2, 0.5)
  small = membership.bootstrap_auc(m, n, num_bootstrap=400, seed=3)
  assert small["ci"][0] < small["auc"] < small["ci"][1]
  assert small == membership.bootstrap_auc(m, n, num_bootstrap=400, seed=3)
  # The interval is close to the normal approximation with sklearn's AUC at its centre.
  boot = [roc_auc_score(np.r_[np.ones(m.size), np.zeros(n.size)],
                        np.r_[rng_m, rng_n]) for rng_m, rng_n in _resamples(m, n, 400, seed=3)]
  assert small["std"] == pytest.approx(np.std(boot, ddof=1), rel=0.15)
  rng = np.random.default_rng(4)
  big = membership.bootstrap_auc(rng.normal(size=2000) + 0.5, rng.normal(size=2000), num_bootstrap=400)
  assert big["ci"][1] - big["ci"][0] < 0.5 * (small["ci"][1] - small["ci"][0])
  assert big["num_members"] == 2000 and big["level"] == 0.95


def _resamples(m, n, count, seed):
  rng = np.random.default_rng(seed + 100)
  for _ in range(count):
    yield m[rng.integers(0, m.size, m.size)], n[rng.integers(0, n.size, n.size)]


def test_per_sample_masked_mse_matches_numpy_and_the_batch_loss():
  rng = np.random.default_rng(5)
  pred, target = rng.normal(size=(2, 6, 10, 12)).astype(np.float32)
  mask = np.zeros((6, 10), np.float32)
  mask[:, :7] = 1.0  # equal masked counts: the batch loss is the mean of the per-sample losses
  for row in mask:
    rng.shuffle(row)
  got = np.asarray(models.masked_mse(pred, target, mask, per_sample=True))
  ref = np.array([((pred[i] - target[i]) ** 2).mean(-1)[mask[i] > 0].mean() for i in range(6)])
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  np.testing.assert_allclose(got.mean(), float(models.masked_mse(pred, target, mask)), rtol=1e-6)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="member_scores is empty"):
    membership.attack_auc([], [1.0])
  with pytest.raises(ValueError, match="non-finite"):
    membership.attack_auc([np.nan], [1.0])
  with pytest.raises(ValueError, match="num_bootstrap"):
    membership.bootstrap_auc([1.0], [0.0], num_bootstrap=0)
  with pytest.raises(ValueError, match="mia_mask_ratio"):
    forward.make_loss_fn(None, 1.0, 1)


# --- The attack on a real model and real X-rays. ---


def demo_xrays(count):
  """`count` random images of the demo training split. Members and non-members are random parts of one
  split, so any difference the attack finds is membership, not a shift between splits."""
  cfg = data_lib.data_config()
  cfg.name, cfg.image_size = "demo_xray", IMAGE
  images = np.concatenate([b["image"] for b in data_lib.make_eval_iterator(
      cfg, batch_size=512, split="train", process_index=0, process_count=1)])
  return images[np.random.default_rng(0).permutation(len(images))[:count]].astype(np.float32)


def tiny_mae():
  cfg = models.model_config("micro")
  cfg.update(dict(width=64, depth=2, num_heads=2, decoder_width=64, decoder_depth=1, decoder_heads=2,
                  patch_size_2d=(8, 8)))
  return models.build_mae(cfg)


@pytest.fixture(scope="module")
def overfit():
  """A tiny MAE trained to memorise N demo X-rays (scan over STEPS full-batch Adam steps)."""
  model = tiny_mae()
  images = demo_xrays(3 * N)
  members = images[:N]
  params = models.init_mae_params(model, jax.random.PRNGKey(0), [members.shape[1:]])
  tx = optax.adam(2e-3)

  @jax.jit
  def train(params):
    def step(carry, key):
      p, o = carry
      loss, g = jax.value_and_grad(lambda p: model.apply({"params": p}, members, mask_ratio=0.75, train=True,
                                                         rngs={"masking": key})["loss"])(p)
      u, o = tx.update(g, o, p)
      return (optax.apply_updates(p, u), o), loss
    (p, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(jax.random.PRNGKey(1), STEPS))
    return p, losses

  # Compiled at XLA's backend optimisation level 2, not the tests' 0 (tests/conftest.py: compile time dominates
  # the other tests): 1200 steps run about 3x faster (about 12 s against 39 s on a 2-core CPU), for about 3 s more
  # compilation; the loss curve and the attack below come out the same (AUC 0.92 either way).
  trained, losses = train.lower(params).compile({"xla_backend_optimization_level": 2})(params)
  data = dict(members=members, unseen=images[N:2 * N], heldout=images[2 * N:])
  return forward.make_loss_fn(model, 0.75, 4), params, trained, np.asarray(losses), data


def attack(loss_fn, params, members, nonmembers):
  lm = np.asarray(loss_fn(params, members, example_keys(0, 1, np.arange(len(members)))))
  ln = np.asarray(loss_fn(params, nonmembers, example_keys(0, 2, np.arange(len(nonmembers)))))
  return membership.bootstrap_auc(-lm, -ln, num_bootstrap=500, seed=0), lm, ln


def test_attack_separates_the_training_split_of_an_overfitted_model(overfit):
  loss_fn, _, trained, losses, data = overfit
  assert losses[-50:].mean() < 0.6 * losses[:50].mean()  # it did fit its training images
  result, lm, ln = attack(loss_fn, trained, data["members"], data["heldout"])
  assert result["auc"] > 0.75 and result["ci"][0] > 0.5, result
  assert lm.mean() < ln.mean()


def test_attack_is_chance_for_images_the_model_never_saw(overfit):
  loss_fn, init, trained, _, data = overfit
  # The overfitted model on two sets it never saw, and a model that never trained on anything.
  for params, members in ((trained, data["unseen"]), (init, data["members"])):
    result, _, _ = attack(loss_fn, params, members, data["heldout"])
    assert result["ci"][0] < 0.5 < result["ci"][1], result
    assert abs(result["auc"] - 0.5) < 0.2, result


def test_per_image_loss_does_not_depend_on_the_batch(overfit):
  loss_fn, _, trained, _, data = overfit
  x, keys = data["members"], example_keys(0, 1, np.arange(N))
  whole = np.asarray(loss_fn(trained, x, keys))
  # Same compiled shape, other company: half the batch replaced, and the batch reversed.
  mixed = np.concatenate([x[:N // 2], data["heldout"][:N // 2]])
  mixed_keys = np.concatenate([keys[:N // 2], example_keys(0, 2, np.arange(N // 2))])
  np.testing.assert_allclose(np.asarray(loss_fn(trained, mixed, mixed_keys))[:N // 2], whole[:N // 2], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(loss_fn(trained, x[::-1], keys[::-1]))[::-1], whole, rtol=1e-5)
  # Other keys draw other masks.
  assert not np.allclose(np.asarray(loss_fn(trained, x, example_keys(1, 1, np.arange(N)))), whole)


def test_feature_fn_is_the_normalised_mean_patch_token():
  model = tiny_mae()
  x = demo_xrays(4)
  params = models.init_mae_params(model, jax.random.PRNGKey(2), [x.shape[1:]])
  tokens, _, _ = model.apply({"params": params}, x, mask_ratio=0.0, train=False, method=models.MAE.encode)
  mean = np.asarray(tokens)[:, 1:].mean(axis=1)
  got = np.asarray(forward.make_feature_fn(model, "mean", normalize=True)(params, x))
  np.testing.assert_allclose(got, mean / np.linalg.norm(mean, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
  cls = np.asarray(forward.make_feature_fn(model, "cls", normalize=False)(params, x))
  np.testing.assert_allclose(cls, np.asarray(tokens)[:, 0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="config.audit.feature"):
    forward.make_feature_fn(model, "max")
