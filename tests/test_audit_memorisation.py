"""The memorisation rate on real demo X-rays: ~1 for copies of training images, ~the base rate for unseen
images, with bootstrap intervals that say so."""

import numpy as np
import pytest

from invcoss_jax import data as data_lib
from invcoss_jax.audit import distances, memorisation

Q = 0.1


def demo_xrays(split):
  cfg = data_lib.data_config()
  cfg.name, cfg.image_size = "demo_xray", 28  # the files' own size: no resampling
  batches = data_lib.make_eval_iterator(cfg, batch_size=512, split=split, process_index=0, process_count=1)
  return np.concatenate([np.asarray(b["image"], np.float32) for b in batches])


@pytest.fixture(scope="module")
def xrays():
  """Training images, and the validation split cut at random into the held-out reference (the threshold)
  and unseen queries drawn the same way; plus every validation image's nearest-training distance."""
  train, val = demo_xrays("train"), demo_xrays("val")
  assert train.shape == (1500, 28, 28, 3) and val.shape == (250, 28, 28, 3)
  val_d = distances.nearest_neighbours(val, train).distance
  order = np.random.default_rng(7).permutation(len(val))
  return train, val[order[125:]], val_d[order[:125]], val_d


def test_copies_of_training_images_are_memorised(xrays):
  train, _, heldout_d, _ = xrays
  rng = np.random.default_rng(0)
  picked = rng.choice(len(train), 200, replace=False)
  copies = train[picked]
  nn = distances.nearest_neighbours(copies, train)
  np.testing.assert_array_equal(nn.distance, 0.0)
  assert memorisation.memorisation_rate(nn.distance, heldout_d, Q) == 1.0
  # Copies with a little sensor noise (1/255 per pixel, far below the nearest unseen image) still count.
  noisy = np.clip(copies + rng.normal(0, 1 / 255, copies.shape).astype(np.float32), 0, 1)
  result = memorisation.bootstrap_memorisation(distances.nearest_neighbours(noisy, train).distance, heldout_d, Q,
                                               num_bootstrap=300)
  assert result["rate"] == 1.0 and result["ci"][0] > 0.9 and result["base_rate"] == Q


def test_unseen_images_score_the_base_rate(xrays):
  train, unseen, heldout_d, val_d = xrays
  d = distances.nearest_neighbours(unseen, train).distance
  result = memorisation.bootstrap_memorisation(d, heldout_d, Q, num_bootstrap=300)
  assert abs(result["rate"] - Q) < 0.08, result
  assert result["ci"][0] < Q < result["ci"][1], result
  # Over many random reference/query cuts of the unseen images the rate averages to the base rate.
  rng = np.random.default_rng(8)
  rates = [memorisation.memorisation_rate(val_d[o[125:]], val_d[o[:125]], Q)
           for o in (rng.permutation(len(val_d)) for _ in range(200))]
  assert np.mean(rates) == pytest.approx(Q, abs=0.015)
  # By construction the held-out set itself sits at (just under) the base rate.
  assert memorisation.memorisation_rate(heldout_d, heldout_d, Q) == pytest.approx(Q, abs=1 / len(heldout_d))


def test_interval_has_exact_bounds_at_zero_and_one():
  rng = np.random.default_rng(2)
  heldout = rng.exponential(size=300)
  none = memorisation.bootstrap_memorisation(heldout + 10.0, heldout, 0.05, num_bootstrap=100)
  assert none["rate"] == 0.0 and none["count"] == 0 and none["ci_bootstrap"] == [0.0, 0.0]
  assert none["ci"][0] == 0.0 and none["ci"][1] == pytest.approx(1 - 0.025 ** (1 / 300))  # ~3.7 / n
  every = memorisation.bootstrap_memorisation(np.zeros(40), heldout, 0.05, num_bootstrap=100)
  assert every["ci"] == pytest.approx([0.025 ** (1 / 40), 1.0])
  # In between, the union covers both the bootstrap and the exact interval.
  mid = memorisation.bootstrap_memorisation(rng.exponential(size=200) * 0.3, heldout, 0.05, num_bootstrap=300)
  assert mid["ci"][0] == min(mid["ci_bootstrap"][0], mid["ci_exact"][0]) < mid["rate"]
  assert mid["ci"][1] == max(mid["ci_bootstrap"][1], mid["ci_exact"][1]) > mid["rate"]


def test_threshold_is_the_quantile_of_the_heldout_distances():
  d = np.random.default_rng(1).exponential(size=333)
  assert memorisation.memorisation_threshold(d, 0.05) == pytest.approx(np.quantile(d, 0.05))
  assert memorisation.memorisation_rate(d * 0.0, d, 0.05) == 1.0
  assert memorisation.memorisation_rate(d + d.max(), d, 0.05) == 0.0


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="memorisation_quantile"):
    memorisation.memorisation_threshold(np.ones(3), 1.5)
  with pytest.raises(ValueError, match="non-finite"):
    memorisation.memorisation_rate(np.array([np.inf]), np.ones(3), 0.1)
  with pytest.raises(ValueError, match="heldout_distances is empty"):
    memorisation.memorisation_rate(np.ones(3), np.array([]), 0.1)
