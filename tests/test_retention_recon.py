"""Retention measures that a re-fitted probe cannot hide: the masked-reconstruction error under fixed masks (the
model's own loss), the decoder re-fit on a frozen encoder, the relative feature distance, and the summary's AVG,
paired differences and content ratio against hand computations."""

import jax
import numpy as np
import pytest

from invcoss_jax import models
from invcoss_jax.continual import params as params_lib
from invcoss_jax.continual.sequence import fresh_params_fn
from invcoss_jax.defaults import load_config_file
from invcoss_jax.retention import features, metrics, reconstruction, report, summary


def _model(**over):
  cfg = dict(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
             patch_size_2d=(8, 8))
  cfg.update(over)
  return models.build_mae(models.ViTConfig(**cfg))


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_fixed_mask_error_is_the_models_own_loss_under_the_same_noise(norm_pix_loss):
  model = _model(norm_pix_loss=norm_pix_loss)
  params = fresh_params_fn(model.cfg)(jax.random.PRNGKey(0))
  images = np.random.default_rng(0).random((13, 16, 16, 3), np.float32)
  noises = reconstruction.fixed_noises(jax.random.PRNGKey(1), 13, reconstruction.num_tokens(model.cfg, (16, 16, 3)), 2)
  rec = reconstruction.Reconstruction(model, mask_ratio=0.75, batch_size=5)  # ragged batches: 5, 5, 3 (padded)
  direct = [float(model.apply({"params": params}, images, mask_ratio=0.75, noise=noises[d])["loss"]) for d in range(2)]
  assert direct[0] != pytest.approx(direct[1], rel=1e-3)  # the masks matter
  np.testing.assert_allclose(rec.errors(params, images, noises).mean(1), direct, rtol=2e-5)
  assert rec.error(params, images, noises) == pytest.approx(np.mean(direct), rel=2e-5)


def test_a_refitted_decoder_reconstructs_real_images_better_than_a_fresh_one_and_deterministically():
  config = load_config_file("configs/retention.py:tiny")
  data = config.continual.datasets.xray
  fit = features.load_split(data, "val", 64).images
  test = features.load_split(data, "test", 48).images
  model = _model()
  params = fresh_params_fn(model.cfg)(jax.random.PRNGKey(0))
  rec = reconstruction.Reconstruction(model, mask_ratio=0.75, batch_size=64, refit_batch_size=16, refit_lr=3e-3)
  noises = reconstruction.fixed_noises(jax.random.PRNGKey(1), len(test), reconstruction.num_tokens(model.cfg, test.shape[1:]), 2)
  fresh = reconstruction.fresh_decoder(model.cfg, jax.random.PRNGKey(5))
  start = params_lib.merge_params(params_lib.split_params(params)[0], fresh)
  before = rec.error(start, test, noises)
  refit, losses = rec.refit_decoder(params, fresh, fit, steps=40, key=jax.random.PRNGKey(2), seed=0)
  after = rec.error(refit, test, noises)
  assert after < 0.8 * before, (before, after, losses[:3], losses[-3:])
  # The encoder side is untouched; the same arguments give the same decoder.
  for k, v in params_lib.split_params(params)[0].items():
    jax.tree.map(np.testing.assert_array_equal, refit[k], v)
  again, _ = rec.refit_decoder(params, fresh, fit, steps=40, key=jax.random.PRNGKey(2), seed=0)
  assert rec.error(again, test, noises) == after


def test_relative_feature_distance():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(20, 6))
  assert metrics.relative_feature_distance(ref, ref) == 0.0
  assert metrics.relative_feature_distance(1.5 * ref, ref) == pytest.approx(0.5)
  assert metrics.relative_feature_distance(-ref, ref) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="same examples"):
    metrics.relative_feature_distance(ref[:3], ref)


# --- summary: AVG, paired differences, content ratio ----------------------------------------------------------

STAGES = ["stage_1_xray", "stage_2_path"]
# (method -> per seed (xray knn after last, path knn after last, stage-1 mae_mse_refit after own, after last))
RUNS = {"seqssl": [(0.60, 0.90, 0.50, 0.80), (0.62, 0.92, 0.52, 0.84), (0.58, 0.88, 0.48, 0.78)],
        "noise": [(0.64, 0.90, 0.50, 0.75), (0.66, 0.91, 0.52, 0.77), (0.63, 0.88, 0.48, 0.74)],
        "er": [(0.74, 0.89, 0.50, 0.60), (0.75, 0.90, 0.52, 0.62), (0.72, 0.86, 0.48, 0.58)],
        "invcoss": [(0.71, 0.90, 0.50, 0.64), (0.73, 0.90, 0.52, 0.66), (0.69, 0.87, 0.48, 0.63)]}


def _synthetic():
  runs = {m: {} for m in RUNS}
  for m, per in RUNS.items():
    for s, (x, p, own, last) in enumerate(per):
      runs[m][s] = {
          STAGES[0]: {"tasks": {"xray": {"knn_auc": 0.8, "logreg_auc": 0.8}, "path": {"knn_auc": 0.5,
                                                                                       "logreg_auc": 0.5}},
                      "cka": {STAGES[0]: 1.0}, "recon": {STAGES[0]: {"mae_mse": 0.3, "mae_mse_refit": own}},
                      "feature_distance": {STAGES[0]: 0.0}},
          STAGES[1]: {"tasks": {"xray": {"knn_auc": x, "logreg_auc": x + 0.1}, "path": {"knn_auc": p,
                                                                                      "logreg_auc": p}},
                      "cka": {STAGES[0]: 0.7, STAGES[1]: 1.0},
                      "recon": {STAGES[0]: {"mae_mse": 0.9, "mae_mse_refit": last},
                                STAGES[1]: {"mae_mse": 0.4, "mae_mse_refit": 0.4}},
                      "feature_distance": {STAGES[0]: 0.1 * (1 + s), STAGES[1]: 0.0}}}
  rnd = {"xray": {"knn_auc": 0.55, "logreg_auc": 0.55}, "path": {"knn_auc": 0.5, "logreg_auc": 0.5}}
  return {"random": {s: rnd for s in range(3)}, "runs": runs}


def test_summary_avg_paired_differences_and_content_ratio_match_hand_computations():
  config = load_config_file("configs/retention.py:tiny")
  s = summary.summarize(config, _synthetic(), STAGES)
  col = lambda m, i: np.array([r[i] for r in RUNS[m]])
  avg = {m: (col(m, 0) + col(m, 1)) / 2 for m in RUNS}
  assert s["avg"]["er"]["mean"] == pytest.approx(avg["er"].mean())
  assert s["avg"]["er"]["ci"] == pytest.approx(metrics.mean_ci(avg["er"])["ci"])
  d = s["paired"]["invcoss-noise"]
  assert d["first_task"]["mean"] == pytest.approx(np.mean(col("invcoss", 0) - col("noise", 0)))
  assert d["first_task"]["ci"] == pytest.approx(metrics.mean_ci(col("invcoss", 0) - col("noise", 0))["ci"])
  assert d["avg"]["mean"] == pytest.approx(np.mean(avg["invcoss"] - avg["noise"]))
  assert d["mae_mse_refit"]["mean"] == pytest.approx(np.mean(col("invcoss", 3) - col("noise", 3)))
  assert d["feature_distance"]["mean"] == pytest.approx(0.0)
  assert s["paired"]["noise-invcoss"]["avg"]["mean"] == pytest.approx(-d["avg"]["mean"])
  assert len(s["paired"]) == 4 * 3
  # Ratio of means: (invcoss - noise) / (er - noise); for the error (noise - invcoss) / (noise - er).
  mean = lambda m, i: col(m, i).mean()
  r = s["ratio"]
  assert r["task"] == "xray" and r["value"] == pytest.approx(
      (mean("invcoss", 0) - mean("noise", 0)) / (mean("er", 0) - mean("noise", 0)))
  assert r["per_metric"]["logreg_auc"]["value"] == pytest.approx(r["value"])  # logreg = knn + 0.1
  assert r["per_metric"]["mae_mse_refit"]["value"] == pytest.approx(
      (mean("noise", 3) - mean("invcoss", 3)) / (mean("noise", 3) - mean("er", 3)))
  # Forgetting of the re-fitted reconstruction: after the last stage minus after the stage's own.
  inc = s["recon"]["seqssl"][STAGES[0]]["mae_mse_refit"]["increase"]
  assert inc["mean"] == pytest.approx(np.mean(col("seqssl", 3) - col("seqssl", 2)))
  assert s["recon"]["er"][STAGES[0]]["mae_mse"]["increase"]["mean"] == pytest.approx(0.6)
  assert s["recon"]["er"][STAGES[0]]["feature_distance"]["final"]["mean"] == pytest.approx(0.2)
  t = s["targets"]
  assert t["invcoss_vs_noise_content_ratio"]["met"]  # ratio about 0.71, paired difference 0.067 +- 0.01
  assert t["avg_invcoss_above_seqssl"]["met"] and t["avg_invcoss_above_noise"]["met"]
  assert "avg_invcoss_above_cassle" not in t  # cassle did not run
  md = report.markdown(s)
  assert "| invcoss - noise |" in md and "Content ratio on xray" in md and "mae_mse_refit" in md
  # Without noise: no ratio, no ratio target.
  data = _synthetic()
  del data["runs"]["noise"]
  s = summary.summarize(config, data, STAGES)
  assert "ratio" not in s and "invcoss_vs_noise_content_ratio" not in s["targets"]


def test_realism_target_needs_a_linear_and_a_nonlinear_judge_near_chance_and_a_strong_noise_anchor():
  from invcoss_jax.retention.summary import judge_targets
  ci = lambda v: dict(mean=v, ci=0.01, n=4)
  def judged(lin, stat, cnn, noise=0.999):
    return dict(judges=dict(replay=dict(c2st_logistic_auc=ci(lin), c2st_statistics_auc=ci(stat), c2st_cnn_auc=ci(cnn)),
                            smoothed_noise={k: ci(noise) for k in ("c2st_logistic_auc", "c2st_statistics_auc",
                                                                     "c2st_cnn_auc")}))
  assert judge_targets(judged(0.6, 0.8, 0.99))["met"]  # linear and gradient boosting near chance
  assert judge_targets(judged(0.6, 0.99, 0.84))["met"]  # or linear and the CNN
  assert not judge_targets(judged(0.6, 0.99, 0.99))["met"]  # only the linear judge is fooled (mean image copy)
  assert not judge_targets(judged(0.1, 0.8, 0.8))["met"]  # far below chance is told apart too
  assert not judge_targets(judged(0.6, 0.8, 0.8, noise=0.9))["met"]  # judges too weak to call noise noise
