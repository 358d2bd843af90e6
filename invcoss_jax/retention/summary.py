"""From per-seed measurements to the benchmark's figures, each a mean with a 95 % interval over seeds.

For a task of stage t (its held-out labelled data) and a metric (e.g. knn_auc):
- gain: metric after stage t minus the random-init encoder's (what pre-training on the stage gave);
- forgetting: metric after stage t minus after the last stage (the gain lost since the stage ended);
- avoided: 1 - forgetting(method) / forgetting(baseline), per seed (the runs of a seed share stage t's model
  when config.retention.share_first_stage, so the pairing is exact for the first stage), and as a ratio of the
  means over seeds;
- drift: linear CKA between stage t's model and the last model on stage t's held-out images.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from invcoss_jax.retention.metrics import mean_ci, significant

REPLAY_SETS = ("replay", "real_same_size", "generator_init")


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
  out["targets"] = targets(out)
  return out


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
  for stage, r in s["replay"].get("invcoss", {}).items():
    if "generator_init" in r:
      fd, fd0 = r["replay"]["frechet"]["mean"], r["generator_init"]["frechet"]["mean"]
      out[f"invcoss_frechet_below_half_init_{stage}"] = dict(value=dict(synthetic=fd, init=fd0), met=fd < 0.5 * fd0)
  return out
