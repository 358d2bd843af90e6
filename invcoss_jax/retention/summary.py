"""From per-seed measurements to the benchmark's figures, each a mean with a 95 % interval over seeds.

For a task of stage t (its held-out labelled data) and a metric (e.g. knn_auc):
- gain: metric after stage t minus the random-init encoder's (what pre-training on the stage gave);
- forgetting: metric after stage t minus after the last stage (the gain lost since the stage ended);
- avoided: 1 - forgetting(method) / forgetting(baseline), per seed (the runs of a seed share stage t's model
  when config.retention.share_first_stage, so the pairing is exact for the first stage), and as a ratio of the
  means over seeds;
- drift: linear CKA between stage t's model and the last model on stage t's held-out images.

For an earlier image stage j (its held-out images, labelled or not; evaluate.Measurer.reconstruction):
- recon: the masked-reconstruction error with the model's own decoder (`mae_mse`) and with a decoder re-fitted on
  the frozen encoder (`mae_mse_refit`) after stage j, after the last stage, and its increase (last minus own;
  positive = forgetting), and the relative feature distance from stage j's model after the last stage.

Across methods (the runs of a seed are paired; 'joint' is left out):
- avg: per seed, the mean over every labelled task of the headline metric after the last stage (the paper's
  AVG), then mean and interval over seeds;
- paired: for every ordered pair of methods "a-b", the per-seed difference a - b of the first stage's task's
  headline metric after the last stage, of AVG, and of the recon measures' final values on the first stage;
- ratio (with 'invcoss', 'noise' and 'er' all present): (invcoss - noise) / (er - noise) of the means over
  seeds after the last stage, on the first stage's task: what fraction of real replay's benefit over an
  untrained generator the inverted content gives. For an error (lower is better) it is written
  (noise - invcoss) / (noise - er): the same number, so > 0 always means invcoss is on er's side of noise.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from invcoss_jax.retention.metrics import mean_ci, significant

REPLAY_SETS = ("replay", "real_same_size", "generator_init")
RECON_MEASURES = ("mae_mse", "mae_mse_refit")  # errors: lower is better
FINAL_MEASURES = RECON_MEASURES + ("feature_distance",)  # the first stage's values after the last stage
RATIO_METHODS = ("invcoss", "noise", "er")


def _task_stages(stage_names: list[str]) -> dict[str, int]:
  """modality -> index (0-based) of the stage that trains on it."""
  return {name.split("_", 2)[2]: i for i, name in enumerate(stage_names)}


def summarize(config: ml_collections.ConfigDict, data: dict[str, Any], stage_names: list[str]) -> dict[str, Any]:
  rc = config.retention
  methods, seeds = [m for m in data["runs"] if m != "joint"], sorted(data["random"])
  baseline, headline = str(rc.baseline), str(rc.headline)
  last = len(stage_names) - 1
  task_stage = _task_stages(stage_names)
  tasks = sorted({t for s in seeds for t in data["random"][s]}, key=lambda t: task_stage.get(t, 99))
  out: dict[str, Any] = dict(methods=methods, seeds=seeds, stages=stage_names, baseline=baseline, headline=headline,
                             tasks={}, random={}, curves={}, gain={}, forgetting={}, avoided={}, cka={}, replay={})
  for t in tasks:
    metric_names = sorted(data["random"][seeds[0]][t])
    metric_names = [k for k in metric_names if not k.endswith("_converged")]
    out["tasks"][t] = dict(stage=stage_names[task_stage[t]], metrics=metric_names)
    out["random"][t] = {k: mean_ci([data["random"][s][t][k] for s in seeds]) for k in metric_names}

  def value(method, seed, stage, task, metric):
    return float(data["runs"][method][seed][stage_names[stage]]["tasks"][task][metric])

  for m in methods:
    out["curves"][m], out["gain"][m], out["forgetting"][m], out["cka"][m] = {}, {}, {}, {}
    for t in tasks:
      i = task_stage[t]
      names = out["tasks"][t]["metrics"]
      out["curves"][m][t] = {k: [mean_ci([value(m, s, j, t, k) for s in seeds]) for j in range(len(stage_names))]
                             for k in names}
      out["gain"][m][t] = {k: mean_ci([value(m, s, i, t, k) - data["random"][s][t][k] for s in seeds]) for k in names}
      if i < last:
        out["forgetting"][m][t] = {k: mean_ci([value(m, s, i, t, k) - value(m, s, last, t, k) for s in seeds])
                                   for k in names}
    for i in range(last):
      out["cka"][m][stage_names[i]] = mean_ci(
          [data["runs"][m][s][stage_names[last]]["cka"][stage_names[i]] for s in seeds])
    replay = {}
    for i in range(len(stage_names)):
      per_seed = [data["runs"][m][s][stage_names[i]].get("replay") for s in seeds]
      if not all(per_seed):
        continue
      r: dict[str, Any] = {"num_samples": per_seed[0]["num_samples"]}
      for name in REPLAY_SETS + ("test",):
        if name in per_seed[0]:
          r[name] = {k: mean_ci([p[name][k] for p in per_seed]) for k in per_seed[0][name]}
      for name in ("nn_replay_to_train", "nn_test_to_train"):
        r[name] = {k: mean_ci([p[name][k] for p in per_seed]) for k in ("median", "min")}
      if all("judges" in p for p in per_seed):
        r["judges"] = judge_summary([p["judges"] for p in per_seed])
      replay[stage_names[i]] = r
    if replay:
      out["replay"][m] = replay

  if "joint" in data["runs"]:  # the upper bound: one stage over every modality, measured once
    out["joint"] = {t: {k: mean_ci([float(data["runs"]["joint"][s]["stage_1_joint"]["tasks"][t][k]) for s in seeds])
                        for k in out["tasks"][t]["metrics"]} for t in tasks}
  if baseline in methods:
    # Plasticity: what the method costs the last stage's own task, paired per seed against the baseline.
    out["plasticity"] = {}
    for t in tasks:
      if task_stage[t] == last:
        for m in methods:
          out["plasticity"].setdefault(m, {})[t] = {
              k: mean_ci([value(m, s, last, t, k) - value(baseline, s, last, t, k) for s in seeds])
              for k in out["tasks"][t]["metrics"]}
    for m in methods:
      out["avoided"][m] = {}
      for t, per_metric in out["forgetting"][baseline].items():
        i = task_stage[t]
        out["avoided"][m][t] = {}
        for k in per_metric:
          f_b = [value(baseline, s, i, t, k) - value(baseline, s, last, t, k) for s in seeds]
          f_m = [value(m, s, i, t, k) - value(m, s, last, t, k) for s in seeds]
          ratio = [1.0 - fm / fb for fm, fb in zip(f_m, f_b) if fb > 0]
          mb = float(np.mean(f_b))
          out["avoided"][m][t][k] = dict(per_seed=mean_ci(ratio), seeds_with_forgetting=len(ratio),
                                         of_means=(1.0 - float(np.mean(f_m)) / mb) if mb > 0 else float("nan"))
  _recon(out, data, stage_names, methods, seeds)
  _across_methods(out, data, stage_names, methods, seeds)
  out["targets"] = targets(out)
  return out


def _measure(data: dict[str, Any], method: str, seed, after: str, on: str, name: str) -> float | None:
  """A recon measure (or 'feature_distance') of the model after stage `after` on stage `on`'s images; None
  when it was not measured (a text stage, or config.retention.recon disabled)."""
  r = data["runs"][method][seed][after]
  v = r.get("feature_distance", {}).get(on) if name == "feature_distance" else r.get("recon", {}).get(on, {}).get(name)
  return None if v is None else float(v)


def _all_seeds(values: list[float | None]) -> list[float] | None:
  return None if any(v is None for v in values) else values


def _recon(out: dict[str, Any], data: dict[str, Any], stage_names: list[str], methods: list[str], seeds) -> None:
  """out['recon'][method][stage j] for every earlier stage j measured for every seed."""
  last = stage_names[-1]
  out["recon"] = {}
  for m in methods:
    per_stage = {}
    for j in stage_names[:-1]:
      r: dict[str, Any] = {}
      for k in RECON_MEASURES:
        own = _all_seeds([_measure(data, m, s, j, j, k) for s in seeds])
        final = _all_seeds([_measure(data, m, s, last, j, k) for s in seeds])
        if own is not None and final is not None:
          r[k] = dict(own=mean_ci(own), final=mean_ci(final), increase=mean_ci([b - a for a, b in zip(own, final)]))
      fd = _all_seeds([_measure(data, m, s, last, j, "feature_distance") for s in seeds])
      if fd is not None:
        r["feature_distance"] = dict(final=mean_ci(fd))
      if r:
        per_stage[j] = r
    if per_stage:
      out["recon"][m] = per_stage


def _across_methods(out: dict[str, Any], data: dict[str, Any], stage_names: list[str], methods: list[str],
                    seeds) -> None:
  """AVG per method, paired differences of every ordered pair of methods, and invcoss's content ratio."""
  h, first, last = out["headline"], stage_names[0], stage_names[-1]
  tasks = [t for t in out["tasks"] if h in out["tasks"][t]["metrics"]]
  first_task = next((t for t in tasks if out["tasks"][t]["stage"] == first), None)
  out["first_stage"] = dict(stage=first, task=first_task)

  def after_last(m, s, t, k):
    return float(data["runs"][m][s][last]["tasks"][t][k])

  # Per method and seed: every figure the paired differences and the ratio are made of.
  per_seed: dict[str, dict[str, list[float]]] = {}
  for m in methods:
    v: dict[str, list[float]] = {}
    if tasks:
      v["avg"] = [float(np.mean([after_last(m, s, t, h) for t in tasks])) for s in seeds]
    if first_task is not None:
      for k in out["tasks"][first_task]["metrics"]:
        v[f"first_task_{k}"] = [after_last(m, s, first_task, k) for s in seeds]
      v["first_task"] = v[f"first_task_{h}"]
    for k in FINAL_MEASURES:
      vals = _all_seeds([_measure(data, m, s, last, first, k) for s in seeds])
      if vals is not None:
        v[k] = vals
    per_seed[m] = v
  out["avg"] = {m: mean_ci(per_seed[m]["avg"]) for m in methods if "avg" in per_seed[m]}
  shown = ("first_task", "avg") + FINAL_MEASURES
  out["paired"] = {}
  for a in methods:
    for b in methods:
      if a == b:
        continue
      out["paired"][f"{a}-{b}"] = {k: mean_ci([x - y for x, y in zip(per_seed[a][k], per_seed[b][k])])
                                   for k in shown if k in per_seed[a] and k in per_seed[b]}
  if all(m in methods for m in RATIO_METHODS) and first_task is not None:
    per_metric = {}
    for name, key in ((h, f"first_task_{h}"), ("logreg_auc", "first_task_logreg_auc"),
                      ("mae_mse_refit", "mae_mse_refit")):
      if all(key in per_seed[m] for m in RATIO_METHODS):
        inv, noise, er = (float(np.mean(per_seed[m][key])) for m in RATIO_METHODS)
        lower_better = name in RECON_MEASURES
        num, den = (noise - inv, noise - er) if lower_better else (inv - noise, er - noise)
        # Undefined unless real replay keeps more than noise replay (den > 0): there is no content to recover.
        per_metric[name] = dict(value=num / den if den > 0 else float("nan"), invcoss=inv, noise=noise, er=er,
                                lower_is_better=lower_better)
    out["ratio"] = dict(task=first_task, metric=h, value=per_metric[h]["value"], per_metric=per_metric)


JUDGE_AUCS = ("c2st_logistic_auc", "c2st_statistics_auc", "c2st_cnn_auc")


def judge_summary(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
  """{set: {judge key: mean_ci over seeds}} for the sets every seed judged (the replay set and its anchors)."""
  names = [n for n in per_seed[0] if all(n in p for p in per_seed)]
  out: dict[str, dict[str, Any]] = {}
  for n in names:
    keys = [k for k in per_seed[0][n] if all(k in p[n] for p in per_seed)]
    out[n] = {k: mean_ci([float(p[n][k]) for p in per_seed]) for k in keys}
  return out


def judge_targets(r: dict[str, Any], limit: float = 0.85, noise_floor: float = 0.95) -> dict[str, Any]:
  """The realism target of a replay set: the linear pixel judge and a nonlinear one (the CNN, or gradient
  boosting on pixel statistics) at most `limit` on the set, while the smoothed-noise anchor stays above
  `noise_floor` on the same judges (else the judges are too weak to mean anything)."""
  j = r["judges"]
  auc = {k: j["replay"][k]["mean"] for k in JUDGE_AUCS if k in j["replay"]}
  floor = {k: j["smoothed_noise"][k]["mean"] for k in JUDGE_AUCS if k in j.get("smoothed_noise", {})}
  # An AUC far below 0.5 also tells the sets apart (the classifier learnt a rule that flips on held-out folds,
  # e.g. a set packed tighter around the mean image than real images are): judged by 0.5 + |AUC - 0.5|.
  sep = lambda a: 0.5 + abs(a - 0.5)
  ok = {k: bool(k in auc and sep(auc[k]) <= limit and floor.get(k, 0.0) > noise_floor) for k in JUDGE_AUCS}
  met = ok["c2st_logistic_auc"] and (ok["c2st_cnn_auc"] or ok["c2st_statistics_auc"])
  return dict(value=dict(replay=auc, smoothed_noise=floor), per_judge=ok, met=bool(met))


def targets(s: dict[str, Any]) -> dict[str, Any]:
  """The issue's targets on the headline metric, each with the figures it was judged on."""
  h, b = s["headline"], s["baseline"]
  out: dict[str, Any] = {}
  for t, per in s["gain"].get(b, {}).items():
    g = per.get(h)
    if g is not None and s["tasks"][t]["stage"] == s["stages"][0]:
      out[f"pretraining_gain_{t}"] = dict(value=g, met=significant(g) and g["mean"] > 0)
  for t, per in s["forgetting"].get(b, {}).items():
    f = per.get(h)
    out[f"{b}_forgetting_{t}_significant"] = dict(value=f, met=significant(f) and f["mean"] > 0)
    for m, av in s["avoided"].items():
      if m != b and t in av:
        a = av[t][h]
        out[f"{m}_avoids_half_{t}"] = dict(value=a, met=bool(np.isfinite(a["of_means"]) and a["of_means"] >= 0.5))
  paired = s.get("paired", {})
  if "ratio" in s and "invcoss-noise" in paired:
    d = paired["invcoss-noise"]["first_task"]
    v = s["ratio"]["value"]
    out["invcoss_vs_noise_content_ratio"] = dict(
        value=dict(ratio=v, invcoss_minus_noise=d["mean"], ci=d["ci"]),
        met=bool(np.isfinite(v) and v >= 0.5 and significant(d) and d["mean"] > 0))
  for other in ("seqssl", "noise", "cassle"):
    d = paired.get(f"invcoss-{other}", {}).get("avg")
    if d is not None:
      out[f"avg_invcoss_above_{other}"] = dict(value=d, met=significant(d) and d["mean"] > 0)
  for stage, r in s["replay"].get("invcoss", {}).items():
    if "generator_init" in r:
      fd, fd0 = r["replay"]["frechet"]["mean"], r["generator_init"]["frechet"]["mean"]
      out[f"invcoss_frechet_below_half_init_{stage}"] = dict(value=dict(synthetic=fd, init=fd0), met=fd < 0.5 * fd0)
    if "judges" in r:
      out[f"invcoss_realism_{stage}"] = judge_targets(r)
  return out
