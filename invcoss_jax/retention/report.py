"""The benchmark's outputs: retention.json (everything, per seed included), retention.md (the tables) and one
Fig. 6b-like plot per task and metric (the metric after each stage, one line per method, 95 % band)."""

from __future__ import annotations

import math
import os
from typing import Any

import ml_collections

from invcoss_jax.io_utils import atomic_path, atomic_write, atomic_write_json

JSON_FILE, MARKDOWN_FILE = "retention.json", "retention.md"


def fmt(stat: dict[str, float] | None, digits: int = 3) -> str:
  """'mean ± ci' (or 'mean' for one seed, '-' for none)."""
  if not stat or stat.get("n", 0) == 0 or not math.isfinite(stat["mean"]):
    return "-"
  if not math.isfinite(stat.get("ci", float("nan"))):
    return f"{stat['mean']:.{digits}f}"
  return f"{stat['mean']:.{digits}f} ± {stat['ci']:.{digits}f}"


def _flat(v: dict[str, Any], prefix: str = "") -> str:
  """'k 0.12, group.k 0.34' for a (nested) dict of numbers."""
  parts = []
  for k, x in v.items():
    if isinstance(x, dict):
      parts.append(_flat(x, f"{prefix}{k}."))
    else:
      parts.append(f"{prefix}{k} {float(x):.2f}")
  return ", ".join(parts)


JUDGE_COLUMNS = (("c2st_logistic_auc", "C2ST pixels (logistic)"), ("c2st_statistics_auc", "C2ST pixel statistics (GBM)"),
                 ("c2st_cnn_auc", "C2ST CNN"), ("kid", "KID (judge net)"), ("precision", "precision"),
                 ("recall", "recall"), ("density", "density"), ("coverage", "coverage"),
                 ("mean_map_corr", "mean-map corr"), ("std_map_corr", "std-map corr"), ("hist_w1", "histogram W1"),
                 ("spectrum_l2", "spectrum L2"), ("tv", "TV"))


def _judges_markdown(s: dict[str, Any]) -> list[str]:
  """The independent judges of every replay set beside the anchors judged the same way."""
  rows = []
  for m, per_stage in s["replay"].items():
    for st, r in per_stage.items():
      for name, j in r.get("judges", {}).items():
        label = m if name == "replay" else f"({name.replace('_', ' ')})"
        if name != "replay" and any(row[0] == label and row[1] == st for row in rows):
          continue  # anchors are shared by the methods of a seed: shown once per stage
        rows.append((label, st, j))
  if not rows:
    return []
  lines = ["## Independent judges of the replay sets", "",
           "Classifier two-sample tests against the same held-out real images (AUC, out-of-fold; 0.5 = cannot be "
           "told apart, 1 = always told apart), distances in the features of a CNN trained supervised on the "
           "stage's labels (never the inverted model), and pixel statistics. Anchors in parentheses are judged "
           "the same way: real vs real is the best any set can do, smoothed noise the floor.", "",
           "| set | stage | " + " | ".join(c for _, c in JUDGE_COLUMNS) + " |",
           "|---|---|" + "---|" * len(JUDGE_COLUMNS)]
  for label, st, j in rows:
    lines.append(f"| {label} | {st} | " + " | ".join(fmt(j.get(k), 3) for k, _ in JUDGE_COLUMNS) + " |")
  return lines + [""]


def markdown(s: dict[str, Any]) -> str:
  h, b = s["headline"], s["baseline"]
  lines = [f"# Retention benchmark", "",
           f"Methods {', '.join(s['methods'])}; seeds {s['seeds']}; stages {' -> '.join(s['stages'])}. "
           f"Every figure is a mean ± the half-width of its 95 % Student-t interval over the {len(s['seeds'])} seeds. "
           "Probes are fitted on each stage's held-out fit split and scored on its test split.", ""]
  for t, info in sorted(s["tasks"].items(), key=lambda kv: s["stages"].index(kv[1]["stage"])):
    lines += [f"## Task `{t}` (trained in {info['stage']})", "",
              "| method | " + " | ".join(f"{k} after {st}" for st in s["stages"] for k in (h,)) +
              f" | gain over random ({h}) | forgetting ({h}) | {b}'s forgetting avoided (of means / per seed) |",
              "|---|" + "---|" * (len(s["stages"]) + 3)]
    lines.append("| random init | " + " | ".join(fmt(s["random"][t].get(h)) for _ in s["stages"]) + " | - | - | - |")
    for m in s["methods"]:
      curve = s["curves"][m][t].get(h, [])
      av = s["avoided"].get(m, {}).get(t, {}).get(h)
      av_txt = "-" if not av or m == b else f"{av['of_means']:.2f} / {fmt(av['per_seed'], 2)}"
      lines.append(f"| {m} | " + " | ".join(fmt(c) for c in curve) +
                   f" | {fmt(s['gain'][m][t].get(h))} | {fmt(s['forgetting'][m].get(t, {}).get(h))} | {av_txt} |")
    if "joint" in s:
      cells = [""] * (len(s["stages"]) - 1) + [fmt(s["joint"][t].get(h)), "-", "-", "-"]
      lines.append("| joint (upper bound, one stage) | " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["All metrics after the last stage (and the random-init encoder):", "",
              "| method | " + " | ".join(info["metrics"]) + " |", "|---|" + "---|" * len(info["metrics"]),
              "| random init | " + " | ".join(fmt(s["random"][t][k]) for k in info["metrics"]) + " |"]
    for m in s["methods"]:
      lines.append(f"| {m} | " + " | ".join(fmt(s["curves"][m][t][k][-1]) for k in info["metrics"]) + " |")
    if "joint" in s:
      lines.append("| joint | " + " | ".join(fmt(s["joint"][t][k]) for k in info["metrics"]) + " |")
    lines.append("")
    if s["forgetting"][s["methods"][0]].get(t):
      lines += ["Forgetting of every metric (after its stage minus after the last):", "",
                "| method | " + " | ".join(info["metrics"]) + " |", "|---|" + "---|" * len(info["metrics"])]
      for m in s["methods"]:
        lines.append(f"| {m} | " + " | ".join(fmt(s["forgetting"][m][t][k]) for k in info["metrics"]) + " |")
      lines.append("")
  if s.get("plasticity"):
    lines += ["## Plasticity", "",
              f"The last stage's own task after it, minus {b}'s, paired per seed (what the method costs the new stage):",
              "", "| method | " + " | ".join(f"{t} {h}" for t in next(iter(s["plasticity"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(s["plasticity"].values())))]
    for m, per in s["plasticity"].items():
      lines.append(f"| {m} | " + " | ".join(fmt(per[t].get(h)) for t in per) + " |")
    lines.append("")
  lines += ["## Representation drift", "",
            "Linear CKA between each stage's own model and the last model, on that stage's held-out images "
            "(1 = no drift).", "", "| method | " + " | ".join(s["stages"][:-1]) + " |",
            "|---|" + "---|" * (len(s["stages"]) - 1)]
  for m in s["methods"]:
    lines.append(f"| {m} | " + " | ".join(fmt(s["cka"][m].get(st)) for st in s["stages"][:-1]) + " |")
  lines.append("")
  lines += _recon_markdown(s)
  lines += _across_methods_markdown(s)
  if s["replay"]:
    lines += ["## Replay sets", "",
              "Fréchet distance to the stage's held-out images in the frozen stage encoder's feature space "
              "(lower is closer), mean pairwise cosine of those features (lower is more diverse; held-out real "
              "images for reference), and the median Euclidean distance of each image to its nearest training "
              "image (pixels; held-out images for reference).", "",
              "| method | stage | N | FD replay | FD real, same N | FD generator at init | cosine replay | "
              "cosine held-out | NN replay -> train | NN held-out -> train |", "|---|" * 10 + ""]
    lines[-1] = "|---|---|---|---|---|---|---|---|---|---|"
    for m, per_stage in s["replay"].items():
      for st, r in per_stage.items():
        lines.append(f"| {m} | {st} | {r['num_samples']} | {fmt(r['replay']['frechet'], 2)} | "
                     f"{fmt(r['real_same_size']['frechet'], 2)} | "
                     f"{fmt(r.get('generator_init', {}).get('frechet'), 2)} | "
                     f"{fmt(r['replay']['mean_pairwise_cosine'])} | {fmt(r['test']['mean_pairwise_cosine'])} | "
                     f"{fmt(r['nn_replay_to_train']['median'], 2)} | {fmt(r['nn_test_to_train']['median'], 2)} |")
    lines.append("")
    lines += _judges_markdown(s)
  lines += ["## Targets", "", "| target | met | figures |", "|---|---|---|"]
  for name, t in s["targets"].items():
    v = t["value"]
    txt = fmt(v) if "mean" in v else (f"of means {v['of_means']:.2f}, per seed {fmt(v['per_seed'], 2)}"
                                      if "of_means" in v else _flat(v))
    lines.append(f"| {name} | {'yes' if t['met'] else 'no'} | {txt} |")
  return "\n".join(lines) + "\n"


def _recon_markdown(s: dict[str, Any]) -> list[str]:
  if not s.get("recon"):
    return []
  lines = ["## Masked reconstruction and feature distance", "",
           "On each earlier image stage's held-out images, under the same fixed masks for every method: the MAE "
           "masked-patch error with the model's own decoder (`mae_mse`; with config.continual.reinit_decoder, a "
           "later model's decoder was trained on the later stage only) and with a fresh decoder re-fitted on the frozen encoder "
           "(`mae_mse_refit`), after the stage itself and after the last stage, and the increase (positive = "
           "forgetting); and the mean relative distance of each image's feature from the stage's own model's after "
           "the last stage (0 = no drift).", "",
           "| method | stage | mae_mse own | mae_mse last | increase | refit own | refit last | refit increase | "
           "feature distance |", "|---|---|---|---|---|---|---|---|---|"]
  for m, per_stage in s["recon"].items():
    for st, r in per_stage.items():
      cells = []
      for k in ("mae_mse", "mae_mse_refit"):
        cells += [fmt(r.get(k, {}).get(x), 4) for x in ("own", "final", "increase")]
      cells.append(fmt(r.get("feature_distance", {}).get("final"), 4))
      lines.append(f"| {m} | {st} | " + " | ".join(cells) + " |")
  return lines + [""]


def _pair_order(methods: list[str]) -> list[tuple[str, str]]:
  """Each unordered pair once, as (a, b) with invcoss first where present, else in the run's order (the JSON
  has every ordered pair)."""
  order = (["invcoss"] if "invcoss" in methods else []) + [m for m in methods if m != "invcoss"]
  return [(a, b) for i, a in enumerate(order) for b in order[i + 1:]]


def _across_methods_markdown(s: dict[str, Any]) -> list[str]:
  if not s.get("avg") and not s.get("paired"):
    return []
  h, first = s["headline"], s.get("first_stage", {})
  t1, st1 = first.get("task"), first.get("stage")
  recon1 = {m: per.get(st1, {}) for m, per in s.get("recon", {}).items()}
  lines = ["## AVG and the first stage after the last", "",
           f"AVG: per seed, the mean {h} over every labelled task after the last stage. The first stage "
           f"({st1}) after the last: its task's probes"
           + ("" if t1 else " (none: the stage has no labelled task)") +
           ", and its reconstruction measures (increase since the stage; feature distance).", "",
           f"| method | AVG ({h}) | {t1} {h} | {t1} logreg_auc | mae_mse increase | mae_mse_refit increase | "
           "feature distance |", "|---|---|---|---|---|---|---|"]
  for m in s["methods"]:
    curve = s["curves"].get(m, {}).get(t1, {}) if t1 else {}
    r = recon1.get(m, {})
    lines.append(f"| {m} | {fmt(s.get('avg', {}).get(m))} | "
                 f"{fmt(curve[h][-1]) if h in curve else '-'} | "
                 f"{fmt(curve['logreg_auc'][-1]) if 'logreg_auc' in curve else '-'} | "
                 f"{fmt(r.get('mae_mse', {}).get('increase'), 4)} | "
                 f"{fmt(r.get('mae_mse_refit', {}).get('increase'), 4)} | "
                 f"{fmt(r.get('feature_distance', {}).get('final'), 4)} |")
  lines.append("")
  if s.get("paired"):
    lines += ["Paired differences a - b per seed (after the last stage; errors and distance on the first stage's "
              "images: negative = a keeps more):", "",
              f"| a - b | {t1} {h} | AVG ({h}) | mae_mse | mae_mse_refit | feature distance |",
              "|---|---|---|---|---|---|"]
    for a, b in _pair_order(s["methods"]):
      d = s["paired"].get(f"{a}-{b}", {})
      lines.append(f"| {a} - {b} | {fmt(d.get('first_task'))} | {fmt(d.get('avg'))} | {fmt(d.get('mae_mse'), 4)} | "
                   f"{fmt(d.get('mae_mse_refit'), 4)} | {fmt(d.get('feature_distance'), 4)} |")
    lines.append("")
  if "ratio" in s:
    r = s["ratio"]
    lines += [f"Content ratio on {r['task']} after the last stage, (invcoss - noise) / (er - noise) of the means "
              "over seeds (for an error, (noise - invcoss) / (noise - er)): " +
              ", ".join(f"{k} {v['value']:.2f}" for k, v in r["per_metric"].items()) + ".", ""]
  return lines


def plot(s: dict[str, Any], task: str, metric: str):
  """A matplotlib Figure: the metric after each stage, one line per method with its 95 % band."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(max(5.0, 1.6 + 1.3 * len(s["stages"])), 3.6))
  ax = fig.add_subplot(1, 1, 1)
  x = list(range(len(s["stages"])))
  for m in s["methods"]:
    curve = s["curves"][m][task][metric]
    mean = [c["mean"] for c in curve]
    ci = [c["ci"] if math.isfinite(c.get("ci", float("nan"))) else 0.0 for c in curve]
    line, = ax.plot(x, mean, marker="o", label=m)
    ax.fill_between(x, [a - b for a, b in zip(mean, ci)], [a + b for a, b in zip(mean, ci)],
                    color=line.get_color(), alpha=0.2)
  if "joint" in s:
    j = s["joint"][task][metric]
    ax.errorbar([x[-1]], [j["mean"]], yerr=[j["ci"] if math.isfinite(j.get("ci", float("nan"))) else 0.0],
                fmt="*", color="black", markersize=10, capsize=3, label="joint (upper bound)")
  r = s["random"][task][metric]
  ax.axhline(r["mean"], color="grey", linestyle="--", linewidth=1, label="random init")
  ax.set_xticks(x)
  ax.set_xticklabels([f"after {st.split('_', 2)[2]}" for st in s["stages"]])
  ax.set_ylabel(f"{task} {metric}")
  ax.set_title(f"{task}: {metric} after each stage ({len(s['seeds'])} seeds, 95 % CI)", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def plot_forgetting(s: dict[str, Any], metric: str):
  """A matplotlib Figure: each method's forgetting of every earlier task (paired per seed), with 95 % CI bars."""
  from matplotlib.figure import Figure
  tasks = [t for t in s["tasks"] if s["forgetting"][s["methods"][0]].get(t)]
  fig = Figure(figsize=(max(4.0, 1.2 + 1.0 * len(s["methods"]) * len(tasks)), 3.2))
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / max(len(s["methods"]), 1)
  for i, m in enumerate(s["methods"]):
    stats = [s["forgetting"][m][t][metric] for t in tasks]
    ax.bar([j + i * width for j in range(len(tasks))], [st["mean"] for st in stats], width,
           yerr=[st["ci"] if math.isfinite(st.get("ci", float("nan"))) else 0.0 for st in stats], capsize=3,
           label=m)
  ax.axhline(0.0, color="black", linewidth=0.8)
  ax.set_xticks([j + width * (len(s["methods"]) - 1) / 2 for j in range(len(tasks))])
  ax.set_xticklabels(tasks)
  ax.set_ylabel(f"forgetting ({metric})")
  ax.set_title(f"forgetting after the last stage ({len(s['seeds'])} seeds, 95 % CI)", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def write(workdir: str, config: ml_collections.ConfigDict, s: dict[str, Any], measurer=None) -> list[str]:
  """Writes retention.json, retention.md and the plots into `workdir`; returns the paths."""
  paths = [os.path.join(workdir, JSON_FILE), os.path.join(workdir, MARKDOWN_FILE)]
  atomic_write_json(paths[0], s)
  atomic_write(paths[1], markdown(s))
  metrics = [str(m) for m in config.retention.get("plot_metrics", ())] or [s["headline"]]
  for t in s["tasks"]:
    for k in metrics:
      if k not in s["curves"][s["methods"][0]][t]:
        continue
      path = os.path.join(workdir, f"retention_{t}_{k}.png")
      with atomic_path(path) as tmp:
        plot(s, t, k).savefig(tmp, format="png", dpi=120)
      paths.append(path)
  for k in metrics:
    if any(s["forgetting"][s["methods"][0]].values()):
      path = os.path.join(workdir, f"retention_forgetting_{k}.png")
      with atomic_path(path) as tmp:
        plot_forgetting(s, k).savefig(tmp, format="png", dpi=120)
      paths.append(path)
  return paths
