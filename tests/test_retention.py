"""The retention benchmark: its metrics against independent references, its summary on known measurements, and
the whole job on the embedded demo data with known answers (a model that never trains: gain 0, forgetting 0,
CKA 1), resuming after a lost measurement to the same result."""

import json
import os

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from invcoss_jax.defaults import load_config_file
from invcoss_jax.retention import metrics, summary
from invcoss_jax.jobs import retention as retention_job


# --- metrics -------------------------------------------------------------------------------------------------


def _cka_hsic(x, y):
  """CKA from its kernel definition (Kornblith et al. 2019, Eq. 3 with linear kernels)."""
  n = x.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
  hsic = lambda a, b: np.sum(a * b)
  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_linear_cka_matches_the_kernel_definition_and_its_invariances():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 8))
  y = x @ rng.normal(size=(8, 5)) + 0.5 * rng.normal(size=(50, 5))
  np.testing.assert_allclose(metrics.linear_cka(x, y), _cka_hsic(x, y), rtol=1e-10)
  assert metrics.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  assert metrics.linear_cka(x, 3.0 * x @ q + 7.0) == pytest.approx(1.0, abs=1e-10)  # rotation, scale, shift
  assert metrics.linear_cka(x, rng.normal(size=(50, 8))) < 0.5
  with pytest.raises(ValueError, match="same examples"):
    metrics.linear_cka(x, y[:10])


def _frechet_reference(x, y):
  """The same distance through the symmetric form Tr((S_x^1/2 S_y S_x^1/2)^1/2)."""
  mx, my = x.mean(0), y.mean(0)
  sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  r = scipy.linalg.sqrtm(sx).real
  return np.sum((mx - my) ** 2) + np.trace(sx) + np.trace(sy) - 2 * np.trace(scipy.linalg.sqrtm(r @ sy @ r).real)


def test_frechet_distance_matches_a_reference_and_is_zero_for_a_set_and_itself():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(400, 6))
  y = 1.5 * rng.normal(size=(300, 6)) + 0.7
  np.testing.assert_allclose(metrics.frechet_distance(x, y), _frechet_reference(x, y), rtol=1e-6)
  assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
  # A pure shift by d adds |d|^2.
  np.testing.assert_allclose(metrics.frechet_distance(x, x + 2.0), 6 * 4.0, rtol=1e-8)


def test_probes_separate_separable_classes_and_not_random_ones():
  rng = np.random.default_rng(2)
  y = rng.integers(0, 2, 400)
  x = rng.normal(size=(400, 16))
  x[:, :2] += 4.0 * y[:, None]
  s = metrics.probe_scores(x[:200], y[:200], x[200:], y[200:], knn_k=10)
  assert s["logreg_auc"] > 0.98 and s["knn_auc"] > 0.95 and s["logreg_converged"] == 1.0
  noise = rng.normal(size=(400, 16))
  s = metrics.probe_scores(noise[:200], y[:200], noise[200:], y[200:], knn_k=10)
  assert abs(s["logreg_auc"] - 0.5) < 0.15 and abs(s["knn_auc"] - 0.5) < 0.15
  with pytest.raises(ValueError, match="single class"):
    metrics.probe_scores(x[:10], np.zeros(10), x[10:20], y[10:20])


def test_mean_ci_is_the_student_t_interval():
  v = [0.1, 0.25, 0.18, 0.3]
  lo, hi = scipy.stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=scipy.stats.sem(v))
  s = metrics.mean_ci(v)
  assert s["mean"] == pytest.approx(np.mean(v)) and s["ci"] == pytest.approx((hi - lo) / 2)
  assert metrics.significant(s) and not metrics.significant(metrics.mean_ci([0.1, -0.1, 0.05]))
  assert metrics.mean_ci([0.3])["n"] == 1 and np.isnan(metrics.mean_ci([0.3])["ci"])


def test_mean_pairwise_cosine():
  x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  expected = np.mean([0.0, 1 / np.sqrt(2), 1 / np.sqrt(2)])
  assert metrics.mean_pairwise_cosine(x) == pytest.approx(expected)


# --- summary on known measurements ----------------------------------------------------------------------------


def _measurement(value_after, cka, path=0.5):
  return {"tasks": {"xray": {"knn_auc": value_after, "logreg_auc": value_after},
                    "path": {"knn_auc": path, "logreg_auc": path}}, "cka": cka}


def test_summary_gain_forgetting_and_avoided_fraction():
  config = load_config_file("configs/retention.py:tiny")
  stages = ["stage_1_xray", "stage_2_path"]
  # seqssl forgets 0.10 (seed 0) and 0.20 (seed 1); invcoss forgets 0.05 and 0.05: it avoids 1/2 and 3/4.
  runs = {"seqssl": {}, "invcoss": {}}
  for s, (after1, seq2, inv2) in enumerate([(0.9, 0.8, 0.85), (0.8, 0.6, 0.75)]):
    runs["seqssl"][s] = {stages[0]: _measurement(after1, {stages[0]: 1.0}),
                         stages[1]: _measurement(seq2, {stages[0]: 0.5, stages[1]: 1.0})}
    runs["invcoss"][s] = {stages[0]: _measurement(after1, {stages[0]: 1.0}),
                          stages[1]: _measurement(inv2, {stages[0]: 0.9, stages[1]: 1.0}, path=0.9 - 0.1 * s)}
    runs["seqssl"][s][stages[1]]["tasks"]["path"] = {"knn_auc": 0.95, "logreg_auc": 0.95}
  rnd = lambda v: {"xray": {"knn_auc": v, "logreg_auc": v}, "path": {"knn_auc": 0.5, "logreg_auc": 0.5}}
  data = {"random": {0: rnd(0.7), 1: rnd(0.6)}, "runs": runs}
  s = summary.summarize(config, data, stages)
  assert s["gain"]["seqssl"]["xray"]["knn_auc"]["mean"] == pytest.approx(0.2)
  assert s["forgetting"]["seqssl"]["xray"]["knn_auc"]["mean"] == pytest.approx(0.15)
  assert s["forgetting"]["invcoss"]["xray"]["knn_auc"]["mean"] == pytest.approx(0.05)
  av = s["avoided"]["invcoss"]["xray"]["knn_auc"]
  assert av["per_seed"]["mean"] == pytest.approx(0.625) and av["of_means"] == pytest.approx(1 - 0.05 / 0.15)
  assert s["avoided"]["seqssl"]["xray"]["knn_auc"]["of_means"] == pytest.approx(0.0)
  assert s["cka"]["invcoss"][stages[0]]["mean"] == pytest.approx(0.9)
  assert s["targets"]["invcoss_avoids_half_xray"]["met"]
  assert [c["mean"] for c in s["curves"]["seqssl"]["xray"]["knn_auc"]] == pytest.approx([0.85, 0.7])
  # The last stage's task: invcoss reaches 0.9 and 0.8 where seqssl reaches 0.95: it costs 0.10 on average.
  assert s["plasticity"]["invcoss"]["path"]["knn_auc"]["mean"] == pytest.approx(-0.10)
  assert "path" not in s["forgetting"]["invcoss"]  # nothing comes after the last stage


def test_bad_options_are_refused_before_any_run(tmp_path):
  config = load_config_file("configs/retention.py:tiny")
  config.retention.methods = ("seqssl", "nonsense")
  with pytest.raises(ValueError, match="nonsense"):
    retention_job.run(config, tmp_path)
  config = load_config_file("configs/retention.py:tiny")
  config.retention.fit_split = "test"
  with pytest.raises(ValueError, match="fit_split and test_split"):
    retention_job.run(config, tmp_path)
  from invcoss_jax.config_checks import ConfigError  # printed as one line by the entry point
  config = load_config_file("configs/retention.py:tiny")
  config.retention.replay.judges.folds = 1
  with pytest.raises(ConfigError, match="judges.*folds=1"):
    retention_job.run(config, tmp_path)
  config = load_config_file("configs/retention.py:content")
  config.continual.datasets.mri.path = str(tmp_path / "missing" / "hippocampus_slices_32.npz")
  with pytest.raises(ConfigError, match="datasets.mri.path=.*build_mri_slices.py"):
    retention_job.run(config, tmp_path)
  config = load_config_file("configs/retention.py:tiny")
  config.retention.methods = ("seqssl", "noise")
  config.inversion.generator = "none"
  with pytest.raises(ConfigError, match="'noise'.*generator='none'"):
    retention_job.run(config, tmp_path)
  assert not os.listdir(tmp_path)


# --- the job end to end ---------------------------------------------------------------------------------------


def test_a_model_that_never_trains_has_no_gain_no_forgetting_and_no_drift_and_resume_is_exact(tmp_path, monkeypatch):
  from invcoss_jax.retention import evaluate as retention_evaluate
  probed = []
  probe = retention_evaluate.Measurer._tasks
  monkeypatch.setattr(retention_evaluate.Measurer, "_tasks",
                      lambda self, params, seed: probed.append(seed) or probe(self, params, seed))
  config = load_config_file("configs/retention.py:tiny")
  config.retention.seeds = (0, 1)
  config.retention.methods = ("seqssl", "invcoss", "joint")
  config.train.base_lr = 0.0  # every stage's encoder stays the random initialisation
  config.retention.finetune.enabled = True  # fine-tuning from the same weights with the same seed: the same result
  config.retention.finetune.steps = 2
  config.retention.recon.refit_steps = 3
  config.retention.recon.mask_draws = 2
  # One checkpoint per stage, at its last step (the tiny preset saves every 2 steps: twice the orbax saves, about a
  # tenth of this test's time): no stage is resumed here; what resumes below is the benchmark's measurements.
  config.checkpoint.every_steps = config.total_steps
  out = retention_job.run(config, tmp_path)
  # Every trained model of a seed has the same values (lr 0; the decoder re-initialised at stage 1): probed
  # once per seed beside the random encoder (tasks are cached by parameter values), not per (method, stage).
  assert sorted(probed) == [0, 0, 1, 1]
  for m in ("seqssl", "invcoss"):
    for k in ("knn_auc", "logreg_auc", "logreg_acc", "finetune_acc", "finetune_auc"):
      assert out["gain"][m]["xray"][k]["mean"] == pytest.approx(0.0, abs=1e-9)
      assert out["forgetting"][m]["xray"][k]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert out["cka"][m]["stage_1_xray"]["mean"] == pytest.approx(1.0, abs=1e-6)
  assert "path" not in out["tasks"]  # the demo pathology tiles have no labels: no probe
  # joint (one stage over both modalities) is reported as the upper bound, from the same initialisation.
  assert out["joint"]["xray"]["knn_auc"]["mean"] == pytest.approx(out["random"]["xray"]["knn_auc"]["mean"])
  assert "joint" not in out["forgetting"]
  replay = out["replay"]["invcoss"]["stage_1_xray"]
  assert replay["num_samples"] == 16 and replay["replay"]["frechet"]["mean"] > 0
  # Independent judges: the set and its anchors against the same held-out images (val split).
  judged = replay["judges"]
  assert set(judged) == {"replay", "real_vs_real", "smoothed_noise", "generator_init"}
  for j in judged.values():
    for k in ("c2st_logistic_auc", "c2st_statistics_auc", "c2st_cnn_auc"):
      assert 0.0 <= j[k]["mean"] <= 1.0
    assert j["kid"]["n"] == 2 and 0.0 <= j["coverage"]["mean"] <= 1.0  # the demo X-rays are labelled
  assert "invcoss_realism_stage_1_xray" in out["targets"]
  assert (tmp_path / "measurements" / "seed_0" / "anchors_stage_1_xray_16.json").is_file()
  assert not out["targets"]["pretraining_gain_xray"]["met"]
  # The same encoder after every stage: the re-fitted decoder (same fresh decoder, batches and masks per
  # (seed, stage)) reconstructs stage 1's images exactly as well, and no feature moved.
  for m in ("seqssl", "invcoss"):
    r = out["recon"][m]["stage_1_xray"]
    assert r["mae_mse_refit"]["increase"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert r["mae_mse_refit"]["own"]["mean"] > 0 and r["mae_mse"]["final"]["mean"] > 0
    assert r["feature_distance"]["final"]["mean"] == pytest.approx(0.0, abs=1e-6)
  assert out["paired"]["invcoss-seqssl"]["avg"]["mean"] == pytest.approx(0.0, abs=1e-9)
  assert not out["targets"]["avg_invcoss_above_seqssl"]["met"]
  last = json.loads((tmp_path / "measurements" / "seed_0" / "invcoss" / "stage_2_path.json").read_text())
  assert set(last["recon"]) == set(last["feature_distance"]) == {"stage_1_xray", "stage_2_path"}  # unlabelled too
  # Stage 1 was trained once per seed and copied: invcoss's first stage measures exactly as seqssl's.
  m = tmp_path / "measurements" / "seed_1"
  first = [json.loads((m / x / "stage_1_xray.json").read_text()) for x in ("seqssl", "invcoss")]
  assert first[0]["tasks"] == first[1]["tasks"] and first[0]["recon"] == first[1]["recon"]
  for f in ("retention.json", "retention.md", "retention_xray_knn_auc.png"):
    assert os.path.isfile(tmp_path / f)
  assert os.path.isfile(tmp_path / "measurements" / "grids" / "seed_1_invcoss_stage_1_xray.png")
  before = json.loads((tmp_path / "retention.json").read_text())
  # A lost measurement (e.g. a kill before it was written) is re-made, and only it.
  lost = tmp_path / "measurements" / "seed_1" / "invcoss" / "stage_2_path.json"
  kept = tmp_path / "measurements" / "seed_0" / "seqssl" / "stage_2_path.json"
  mtime = kept.stat().st_mtime_ns
  lost.unlink()
  # A measurement made before the reconstruction measures existed gets them added, the same as measured whole.
  older = tmp_path / "measurements" / "seed_0" / "invcoss" / "stage_2_path.json"
  whole = json.loads(older.read_text())
  older.write_text(json.dumps({k: v for k, v in whole.items() if k not in ("recon", "feature_distance")}))
  retention_job.run(config, tmp_path)
  assert lost.is_file() and kept.stat().st_mtime_ns == mtime
  assert json.loads(older.read_text()) == whole
  assert json.loads((tmp_path / "retention.json").read_text()) == before


def test_share_first_stage_copies_a_finished_stage_only(tmp_path):
  src, dst = tmp_path / "a", tmp_path / "b"
  (src / "stage_1_xray" / "checkpoints" / "4").mkdir(parents=True)
  (src / "stage_1_xray" / "config.json").write_text("{}")
  assert not retention_job.share_first_stage(str(src), str(dst))  # not finished: no stage_info.json
  (src / "stage_1_xray" / "stage_info.json").write_text('{"done": true}')
  assert retention_job.share_first_stage(str(src), str(dst))
  assert (dst / "stage_1_xray" / "checkpoints" / "4").is_dir()
  assert not (dst / "stage_1_xray" / "stage_info.json").exists()  # the method's own end of stage still runs
  assert not retention_job.share_first_stage(str(src), str(dst))


def test_progress_estimates_the_time_left_per_kind_of_unit():
  p = retention_job.Progress({"random": 2, "run": 2})
  p.step("random", "r0", 1.0)
  assert np.isnan(p.eta())  # no run timed yet: unknown, not a guess from the fast units
  p.step("run", "m0", 10.0)
  assert p.eta() == pytest.approx(1.0 + 10.0)
  p.skip("a unit done by an earlier run")  # neither counted nor timed
  assert p.eta() == pytest.approx(11.0) and p.done == 2


def test_ablation_variants_parse_literals_and_reject_malformed_ones():
  import importlib.util
  spec = importlib.util.spec_from_file_location("retention_ablation", os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "retention_ablation.py"))
  ablation = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ablation)
  name, o = ablation.parse_variant('grey:inversion.grey="yes",inversion.invunet.channels=(8, 16),x.y=0.5')
  assert name == "grey" and o == {"inversion.grey": "yes", "inversion.invunet.channels": (8, 16), "x.y": 0.5}
  assert ablation.parse_variant("reference:") == ("reference", {})
  with pytest.raises(ValueError, match="name:key=value"):
    ablation.parse_variant("no-colon")
  with pytest.raises(ValueError, match="not a Python literal"):
    ablation.parse_variant("bad:a.b=yes")


def test_a_benchmark_measured_with_other_options_is_not_resumed(tmp_path):
  from invcoss_jax.config_checks import ConfigError
  config = load_config_file("configs/retention.py:tiny")
  plan = tmp_path / "retention_plan.json"
  plan.write_text(json.dumps(dict(config=json.loads(config.to_json_best_effort()))))
  (tmp_path / "measurements" / "seed_0").mkdir(parents=True)
  config.retention.seeds = (0, 1, 2, 3)  # more seeds (or methods): the same measurements, extended
  config.continual.datasets.xray.read_threads = 5
  retention_job.check_plan(config, str(plan))
  config.retention.knn_k = 7
  with pytest.raises(ConfigError, match=r"holds measurements made with other options \(retention.knn_k: 5 -> 7\)"):
    retention_job.check_plan(config, str(plan))
  config.overwrite_workdir = True
  retention_job.check_plan(config, str(plan))
  assert not (tmp_path / "measurements").exists()


REPORTS = os.path.join(os.environ.get("INVCOSS_SHARED_DATA") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"), "report",
    "indiana_reports.csv")


@pytest.mark.skipif(not os.path.isfile(REPORTS), reason=f"needs the Indiana reports at {REPORTS} (../shared/data "
                    "is not part of a clone; CI has it)")
def test_a_report_stage_is_measured_with_one_vocabulary_on_held_out_reports(tmp_path):
  from invcoss_jax.retention import evaluate
  c = load_config_file("configs/retention.py:report")
  c.continual.datasets.report.text.max_length = 32
  c.continual.datasets.report.text.vocab_size = 400
  c.retention.max_fit_examples = c.retention.max_test_examples = 120
  c.model.update(dict(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2))
  ready = retention_job.with_vocabulary(c, str(tmp_path))
  vocab = str(tmp_path / "vocabulary" / "tokenizer.json")
  assert ready.continual.datasets.report.text.tokenizer == vocab and ready.model.tokenizer == vocab
  assert retention_job.with_vocabulary(ready, str(tmp_path)).model.vocab_size == ready.model.vocab_size <= 400
  # Every (seed, method) run reads that file (no run trains its own vocabulary).
  for seed, method in ((0, "seqssl"), (1, "invcoss")):
    run = retention_job.run_config(ready, seed, method)
    assert run.continual.datasets.report.text.tokenizer == vocab
  m = evaluate.Measurer(ready, str(tmp_path / "measurements"))
  fit, test = m.split("report", "val"), m.split("report", "test")
  assert fit.images.dtype == np.int32 and fit.images.shape == (120, 32) and m.labelled("report")
  assert set(np.unique(fit.labels)) == {0, 1}
  tasks = m.tasks(m.random_params(0), seed=0)
  assert "report" in tasks
  assert 0.0 <= tasks["report"]["knn_auc"] <= 1.0 and 0.0 <= tasks["report"]["logreg_acc"] <= 1.0
  # Text features do not change when the held-out reports get more padding.
  f = m.feats(m.random_params(0), fit.images[:8])
  pad = np.full((8, 16), ready.model.pad_id, np.int32)
  np.testing.assert_allclose(m.feats(m.random_params(0), np.concatenate([fit.images[:8], pad], 1)), f, atol=1e-5)
