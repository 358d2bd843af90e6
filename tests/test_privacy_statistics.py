"""DP feature statistics (docs/privacy.md, inversion/statistics.compute_dp_statistics): without noise and clipping
they are the plain statistics, clipping bounds each example's influence on the sums, the noise has the standard
deviation asked, the stage's epsilon is dp-accounting's own figure for its DP-SGD and its statistics composed,
the ledger records both, and a run without privacy writes the statistics it always did."""

import json
import math
import zipfile

import dp_accounting
import jax
import numpy as np
import pytest
from dp_accounting import pld, rdp

from invcoss_jax import data as data_lib, models
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.defaults import base_config, load_config_file
from invcoss_jax.inversion import stage as inv_stage, statistics
from invcoss_jax.jobs import inversion as inversion_job
from invcoss_jax.privacy import accounting

N = 20


@pytest.fixture(scope="module")
def setup():
  cfg = models.model_config("micro")
  cfg.update(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2, patch_size_2d=(7, 7))
  model = models.build_mae(cfg)
  params = jax.jit(lambda k: models.init_mae_params(model, k, [(28, 28, 3)]))(jax.random.key(0, impl="rbg"))
  d = data_lib.data_config()
  d.update(name="demo_xray", image_size=28)
  xrays = next(iter(data_lib.make_eval_iterator(d, batch_size=N)))["image"]
  return model, params, xrays


def _batches(x):
  return [x[:7], x[7:]]  # ragged: the second batch is larger, the first padded to it


def _flat(sums):
  return np.concatenate([np.ravel(sums[k]) for k in sorted(sums)])


def test_without_noise_and_clipping_dp_statistics_are_the_plain_statistics(setup):
  model, params, x = setup
  plain = statistics.compute_statistics(model, params, _batches(x), pixel=True)
  dp, details = statistics.compute_dp_statistics(model, params, _batches(x), num_examples=N, clip_norm=1e9,
                                                 noise_multiplier=0.0, key=statistics.statistics_noise_key(0),
                                                 pixel=True)
  assert details["clipped_fraction"] == 0.0 and details["floored_fraction"] == 0.0
  assert details["dimension"] == 2 * plain.mean.size + 2 * plain.pixel["mean"].size + 1
  assert dp.count == plain.count == N
  np.testing.assert_allclose(dp.mean, plain.mean, rtol=1e-5, atol=1e-6)
  # E[x^2] - E[x]^2 from float32 sums against the two-pass variance: float32 rounding of the second moment.
  np.testing.assert_allclose(dp.var, plain.var, rtol=1e-4, atol=1e-5 * float(np.mean(plain.mean ** 2 + plain.var)))
  for k in ("mean", "var", "tv"):
    np.testing.assert_allclose(dp.pixel[k], plain.pixel[k], rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="read 20 examples, but N = 21"):
    statistics.compute_dp_statistics(model, params, _batches(x), num_examples=N + 1, clip_norm=1.0,
                                     noise_multiplier=0.0, key=statistics.statistics_noise_key(0))


def test_clipping_bounds_each_examples_contribution(setup):
  model, params, x = setup
  norms = statistics.contribution_norms(model, params, _batches(x), pixel=True)
  assert norms.shape == (N,) and np.all(norms > 0)
  clip = 0.5 * float(norms.min())  # every example clipped
  full, count, clipped = statistics.clipped_sums(model, params, _batches(x), clip_norm=clip, pixel=True)
  assert count == clipped == N
  assert np.linalg.norm(_flat(full)) <= N * clip * (1 + 1e-5)
  for i in (0, 6, 7, 19):
    rest = np.delete(x, i, axis=0)
    without, n, _ = statistics.clipped_sums(model, params, _batches(rest), clip_norm=clip, pixel=True)
    assert n == N - 1
    # Removing example i moves the concatenated sums by its clipped contribution: norm C.
    assert abs(np.linalg.norm(_flat(full) - _flat(without)) / clip - 1) < 1e-4
  # An example under the clip norm is left as it is.
  alone, _, c = statistics.clipped_sums(model, params, [x[:1]], clip_norm=2 * float(norms[0]), pixel=True)
  assert c == 0 and abs(np.linalg.norm(_flat(alone)) / norms[0] - 1) < 1e-5


def test_noise_has_standard_deviation_sigma_c_and_follows_the_seed(setup):
  zeros = {"a": np.zeros((300, 400)), "b": np.zeros(100_000)}
  noisy = statistics.add_gaussian_noise(zeros, 3.0 * 0.5, statistics.statistics_noise_key(1))
  z = _flat(noisy)
  # 220 000 normals: the sample std has relative standard error 1 / sqrt(2n) = 0.15 %.
  assert abs(z.std() / 1.5 - 1) < 0.01 and abs(z.mean()) < 5 * 1.5 / math.sqrt(z.size)
  assert abs(noisy["a"].std() / 1.5 - 1) < 0.02 and abs(noisy["b"].std() / 1.5 - 1) < 0.02
  again = statistics.add_gaussian_noise(zeros, 1.5, statistics.statistics_noise_key(1))
  np.testing.assert_array_equal(_flat(again), z)
  assert not np.allclose(_flat(statistics.add_gaussian_noise(zeros, 1.5, statistics.statistics_noise_key(2))), z)
  # Through the statistics pass: (noisy mean - clean mean) N is the noise on the sums (the mean is not clamped).
  model, params, x = setup
  sigma, clip = 2.0, 10.0
  clean, _, _ = statistics.clipped_sums(model, params, _batches(x), clip_norm=clip)
  dp, _ = statistics.compute_dp_statistics(model, params, _batches(x), num_examples=N, clip_norm=clip,
                                           noise_multiplier=sigma, key=statistics.statistics_noise_key(3))
  noise = (dp.mean * N - clean["mean"]).ravel()
  assert abs(noise.std() / (sigma * clip) - 1) < 0.1  # 2176 normals: relative standard error 1.5 %
  assert np.all(dp.var >= statistics.VARIANCE_FLOOR)


def _dp(**privacy):
  c = base_config().privacy
  c.update(dict(accountant="rdp", delta=1e-5, max_batch_size=10_000, stats_clip_norm=5.0), **privacy)
  return c


def _sgd_ledger(privacy, statistics_share=True):
  plan = accounting.plan_dp_sgd(privacy, expected_batch_size=100, dataset_size=10_000, steps=300, data="x",
                                statistics=statistics_share)
  record = accounting.ledger([plan.mechanism("x")], delta=plan.delta, accountant=plan.accountant, eps=plan.epsilon,
                             dp=True, dp_sgd_epsilon=plan.epsilon, plan_key=accounting.plan_key(plan))
  return plan, json.loads(json.dumps(record))


def _reference(sgd_sigma, stats_sigma, acc):
  sgd = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      0.01, dp_accounting.GaussianDpEvent(sgd_sigma)), 300)
  return acc.compose(sgd).compose(dp_accounting.GaussianDpEvent(stats_sigma)).get_epsilon(1e-5)


@pytest.mark.parametrize("name, make", [("rdp", rdp.RdpAccountant), ("pld", pld.PLDAccountant)])
def test_composed_epsilon_is_dp_accountings_figure(name, make):
  privacy = _dp(noise_multiplier=1.1, stats_noise_multiplier=4.0, accountant=name)
  sgd, record = _sgd_ledger(privacy)
  plan = accounting.plan_dp_statistics(privacy, record, dataset_size=10_000, data="x")
  assert not plan.calibrated and plan.noise_multiplier == 4.0 and plan.clip_norm == 5.0
  assert plan.epsilon == _reference(1.1, 4.0, make())
  assert plan.statistics_epsilon == make().compose(dp_accounting.GaussianDpEvent(4.0)).get_epsilon(1e-5)
  assert plan.dp_sgd_epsilon == sgd.epsilon < plan.epsilon
  assert plan.epsilon == accounting.epsilon([sgd.mechanism("x"), plan.mechanism("x")], 1e-5, name)


def test_calibration_leaves_the_statistics_their_share_and_meets_the_target():
  privacy = _dp(target_epsilon=3.0, stats_epsilon_fraction=0.2)
  sgd, record = _sgd_ledger(privacy)
  alone, _ = _sgd_ledger(privacy, statistics_share=False)
  assert sgd.statistics_epsilon_fraction == 0.2 and sgd.epsilon <= 0.8 * 3.0 < alone.epsilon <= 3.0
  assert sgd.noise_multiplier > alone.noise_multiplier
  plan = accounting.plan_dp_statistics(privacy, record, dataset_size=10_000, data="x")
  assert plan.calibrated and plan.epsilon <= 3.0
  assert plan.epsilon == _reference(sgd.noise_multiplier, plan.noise_multiplier, rdp.RdpAccountant())
  assert _reference(sgd.noise_multiplier, plan.noise_multiplier - 2e-3, rdp.RdpAccountant()) > 3.0
  # A resumed stage takes DP-SGD's own epsilon from the ledger, not the composed one at the top.
  composed = accounting.record_statistics(record, plan, data="x")
  assert composed["epsilon"] == plan.epsilon and composed["dp_sgd_epsilon"] == sgd.epsilon
  again = accounting.plan_dp_sgd(privacy, expected_batch_size=100, dataset_size=10_000, steps=300, data="x",
                                 statistics=True, previous=json.loads(json.dumps(composed)))
  assert again == sgd
  # DP-SGD that took the whole target (fraction 0 when trained) leaves the statistics nothing.
  _, greedy = _sgd_ledger(_dp(target_epsilon=3.0, stats_epsilon_fraction=0.0))
  message = r"privacy.stats_epsilon_fraction=0.2: .* more than \(1 - 0.2\) x privacy.target_epsilon=3.0"
  with pytest.raises(ConfigError, match=message) as e:
    accounting.plan_dp_statistics(privacy, greedy, dataset_size=10_000, data="x")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, message", [
    (dict(noise_multiplier=1.0, stats_clip_norm=0.0), "privacy.stats_clip_norm=0.0: set the L2 bound"),
    (dict(noise_multiplier=1.0, stats_clip_norm=-1.0), "privacy.stats_clip_norm=-1.0: expected a positive"),
    (dict(noise_multiplier=1.0), "privacy.stats_noise_multiplier=0.0 with privacy.noise_multiplier given"),
    (dict(noise_multiplier=1.0, stats_noise_multiplier=math.inf), "privacy.stats_noise_multiplier=inf"),
    (dict(target_epsilon=2.0, stats_epsilon_fraction=0.0), "privacy.stats_epsilon_fraction=0.0 leaves"),
    (dict(target_epsilon=2.0, stats_epsilon_fraction=1.0), "privacy.stats_epsilon_fraction=1.0: expected"),
    (dict(target_epsilon=2.0, stats_noise_multiplier=3.0), "privacy.stats_noise_multiplier=3.0 are both set"),
])
def test_statistics_options_are_checked_with_one_line_errors(change, message):
  with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as e:
    accounting.check_statistics_options(_dp(**change))
  assert "\n" not in str(e.value)


def test_the_ledger_must_be_the_stages():
  privacy = _dp(noise_multiplier=1.1, stats_noise_multiplier=4.0)
  _, record = _sgd_ledger(privacy)
  cases = [(None, {}, "was not trained with DP-SGD"), (record, dict(dataset_size=9_999), "config.data: statistics"),
           (record, dict(data="y"), "config.data: statistics over 'y'"),
           (dict(record, delta=1e-6), {}, "privacy.delta=1e-05: the ledger of the stage is at delta=1e-06"),
           (dict(record, accountant="pld"), {}, "privacy.accountant='rdp': the ledger of the stage used 'pld'")]
  for ledger, kw, message in cases:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
      accounting.plan_dp_statistics(privacy, ledger, **{"dataset_size": 10_000, "data": "x", **kw})
    assert "\n" not in str(e.value)


# --- the stage: pre-training, its ledger, the stats job -------------------------------------------------------


def _stage_config(**privacy):
  c = load_config_file("configs/xray.py:demo")
  c.model.update(dict(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2))
  c.data.image_size = 16
  c.total_steps = 2
  c.train.global_batch_size = 8
  c.checkpoint.every_steps = 100
  c.mesh.num_devices = 1
  c.inversion.stats_batch_size = 512
  c.inversion.pixel_statistics = True
  c.privacy.update(dict(noise_multiplier=2.0, microbatch_size=4, stats_clip_norm=50.0, stats_noise_multiplier=5.0),
                   **privacy)
  return c


@pytest.fixture(scope="module")
def dp_stage(tmp_path_factory):
  from invcoss_jax.jobs.pretrain import pretrain
  workdir = tmp_path_factory.mktemp("dp_stage")
  out = pretrain(_stage_config(), workdir)
  return workdir, out


def test_a_dp_stage_records_its_statistics_and_their_composed_epsilon(dp_stage):
  workdir, out = dp_stage
  ledger = json.loads((workdir / "privacy.json").read_text())
  assert [m["name"] for m in ledger["mechanisms"]] == ["dp_sgd", "dp_statistics"]
  sgd, stats = ledger["mechanisms"]
  assert stats["kind"] == "gaussian" and stats["noise_multiplier"] == 5.0 and stats["clip_norm"] == 50.0
  n, delta = sgd["dataset_size"], ledger["delta"]
  assert stats["dataset_size"] == n and delta == 1 / n
  reference = pld.PLDAccountant().compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.TruncatedSubsampledGaussianDpEvent(dataset_size=n, sampling_probability=8 / n,
                                                       truncated_batch_size=sgd["truncated_batch_size"],
                                                       noise_multiplier=2.0), 2)).compose(
      dp_accounting.GaussianDpEvent(5.0)).get_epsilon(delta)
  assert ledger["epsilon"] == pytest.approx(reference, rel=1e-9)
  assert ledger["dp_sgd_epsilon"] < ledger["epsilon"]
  s = ledger["statistics"]
  assert s["dp"] is True and s["composed_epsilon"] == ledger["epsilon"] and s["file"] == "statistics.npz"
  assert s["epsilon"] == pld.PLDAccountant().compose(dp_accounting.GaussianDpEvent(5.0)).get_epsilon(delta)
  assert "DP feature statistics" in ledger["covers"]
  # The file inversion reads: the usual layout, with its (epsilon, delta).
  loaded = statistics.load_statistics(workdir / "statistics.npz")
  assert loaded.count == n and loaded.pixel is not None and np.all(loaded.var >= statistics.VARIANCE_FLOOR * 0.999)
  np.testing.assert_array_equal(loaded.mean, np.asarray(out["stats"].mean, np.float32))
  assert statistics.read_dp_record(workdir / "statistics.npz") == dict(
      epsilon=ledger["epsilon"], delta=delta, statistics_epsilon=s["epsilon"])
  summary = json.loads((workdir / "statistics.json").read_text())
  assert summary["privacy"]["dp"] is True and summary["privacy"]["epsilon"] == ledger["epsilon"]
  assert "clipped_fraction" not in summary["privacy"]  # computed without noise: logged only


def test_the_stats_job_reproduces_dp_statistics_and_records_plain_ones(dp_stage):
  workdir, _ = dp_stage
  before = (workdir / "statistics.npz").read_bytes()
  ledger = json.loads((workdir / "privacy.json").read_text())
  # The standalone stats job with the same config: the same noise (the key follows config.seed), the same ledger.
  inversion_job.run_stats(_stage_config(), workdir)
  assert (workdir / "statistics.npz").read_bytes() == before
  assert json.loads((workdir / "privacy.json").read_text()) == ledger
  # Privacy off on a DP stage: plain statistics, which the ledger says it does not cover.
  off = _stage_config(noise_multiplier=0.0)
  inversion_job.run_stats(off, workdir)
  plain = json.loads((workdir / "privacy.json").read_text())
  assert plain["statistics"]["dp"] is False and plain["epsilon"] == ledger["dp_sgd_epsilon"]
  assert [m["name"] for m in plain["mechanisms"]] == ["dp_sgd"]
  assert statistics.read_dp_record(workdir / "statistics.npz") is None
  # Started again on the finished stage, pre-training keeps the ledger's record of its statistics.
  inversion_job.run_stats(_stage_config(), workdir)
  from invcoss_jax.train.pretrain import train_stage
  train_stage(_stage_config(), workdir)
  assert json.loads((workdir / "privacy.json").read_text()) == ledger


def test_the_stats_job_refuses_privacy_on_a_stage_not_trained_with_it(tmp_path):
  c = _stage_config()
  c.mode = "stats"
  with pytest.raises(ConfigError, match="config.privacy is on, but the stage in .* was not trained with DP-SGD"):
    inversion_job.run_stats(c, tmp_path)
  assert not (tmp_path / "statistics.npz").exists()
  from invcoss_jax import jobs
  c.privacy.stats_clip_norm = 0.0
  with pytest.raises(ConfigError, match="privacy.stats_clip_norm=0.0"):
    jobs.check_job_options(c)  # before anything is written
  c.mode = "pretrain"
  with pytest.raises(ConfigError, match="privacy.stats_clip_norm=0.0"):
    jobs.check_job_options(c)  # before training
  c.train.stats_after_pretrain = False
  jobs.check_job_options(c)


def test_statistics_without_privacy_are_bit_identical_to_the_plain_pass(setup, tmp_path):
  model, params, _ = setup
  d = data_lib.data_config()
  d.update(name="demo_xray", image_size=28)
  inv = base_config().inversion
  inv.stats_batch_size = 512
  inv.pixel_statistics = True
  mine = inv_stage.write_statistics(model, params, d, inv, tmp_path, None)
  plain = statistics.compute_statistics(model, params, data_lib.make_eval_iterator(d, batch_size=512), pixel=True)
  jax.tree.map(np.testing.assert_array_equal, mine, plain)
  statistics.save_statistics(tmp_path / "reference.npz", plain)
  with zipfile.ZipFile(tmp_path / "statistics.npz") as a, zipfile.ZipFile(tmp_path / "reference.npz") as b:
    assert a.namelist() == b.namelist()
    for name in a.namelist():
      assert a.read(name) == b.read(name)
  assert "privacy" not in json.loads((tmp_path / "statistics.json").read_text())
