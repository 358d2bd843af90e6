"""Forgetting study: downstream performance of every stage of continual runs (the paper's Fig. 6b).

A continual run's workdir holds one trained stage workdir per modality, `stage_<k>_<modality>/`
(k = 1, 2, ...). Each stage's checkpoint is fine-tuned on every configured task; the stage x task
matrix of mean (and std) metrics is written as JSON and CSV and plotted, one line per method.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from typing import Any, Mapping, Sequence

from invcoss_jax import io_utils
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.evaluate.config import DISPLAY_NAMES
from invcoss_jax.evaluate.report import HEADLINE_METRIC

STAGE_RE = re.compile(r"^stage_(\d+)_(.+)$")
FORGETTING_JSON, FORGETTING_CSV, FORGETTING_PNG = "forgetting.json", "forgetting.csv", "forgetting.png"


def find_stages(continual_workdir: str | os.PathLike) -> list[tuple[int, str, str]]:
  """(k, modality, path) of every `stage_<k>_<modality>/` folder, ordered by k."""
  root = os.fspath(continual_workdir)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root} not found: expected a continual run's workdir with "
                            "stage_<k>_<modality>/ folders")
  stages = []
  for name in os.listdir(root):
    m = STAGE_RE.match(name)
    if m and os.path.isdir(os.path.join(root, name)):
      stages.append((int(m.group(1)), m.group(2), os.path.join(root, name)))
  if not stages:
    raise FileNotFoundError(f"{root} holds no stage_<k>_<modality>/ folders (found {sorted(os.listdir(root))})")
  ks = [k for k, _, _ in stages]
  if len(set(ks)) != len(ks):
    raise ValueError(f"{root}: several stage folders share a number: {sorted(s[2] for s in stages)}")
  return sorted(stages)


def parse_runs(entries: Sequence[str], init_from: str = "") -> list[tuple[str, str]]:
  """'Method=/path' entries (or just '/path', named by its folder) -> [(method, path)]."""
  if not entries:
    if not init_from:
      raise ConfigError("config.evaluate.forgetting.runs is empty and config.init_from is not set: "
                       "expected 'Method=/path/to/continual_workdir' entries")
    entries = [init_from]
  runs = []
  for e in entries:
    method, sep, path = str(e).partition("=")
    if not sep:
      method, path = os.path.basename(os.path.normpath(method)), method
    if not method or not path:
      raise ConfigError(f"config.evaluate.forgetting.runs entry {e!r}: expected 'Method=/path'")
    runs.append((method, path))
  names = [m for m, _ in runs]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.evaluate.forgetting.runs: method names must be unique, got {names}")
  return runs


def safe_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "_"


def matrix_csv(matrix: Mapping[str, Any]) -> str:
  """One row per (method, stage): k, modality, then `<task>/<metric>` mean and std columns."""
  cols = []
  for m in matrix["methods"].values():
    for st in m["stages"]:
      for task, res in st["tasks"].items():
        for metric in res["mean"]:
          if (task, metric) not in cols:
            cols.append((task, metric))
  out = io.StringIO()
  w = csv.writer(out, lineterminator="\n")
  w.writerow(["method", "stage", "modality"] + [f"{t}/{k}{s}" for t, k in cols for s in ("", "_std")])
  for method, m in matrix["methods"].items():
    for st in m["stages"]:
      row = [method, st["stage"], st["modality"]]
      for t, k in cols:
        res = st["tasks"].get(t, {"mean": {}, "std": {}})
        row += [res["mean"].get(k, ""), res["std"].get(k, "")]
      w.writerow(row)
  return out.getvalue()


def plot_matrix(matrix: Mapping[str, Any], path: str | os.PathLike, metrics: Sequence[str] = ()) -> None:
  """One panel per (task, metric) over the stages, one line per method (error bars: std over seeds);
  PNG. `metrics` () = each task's headline metric (ACC or DSC); HD95 is plotted as is, the others in %."""
  from matplotlib.figure import Figure  # no pyplot: the caller's backend (e.g. inline plots) is left alone

  panels = []
  for task in matrix["tasks"]:
    names = list(metrics) or [HEADLINE_METRIC[matrix["kinds"][task]]]
    available = {k for m in matrix["methods"].values() for st in m["stages"] for k in st["tasks"][task]["mean"]}
    panels += [(task, k) for k in names if k in available]
  if not panels:
    raise ValueError(f"forgetting plot: none of the metrics {list(metrics)} was computed for tasks "
                     f"{matrix['tasks']}")
  fig = Figure(figsize=(4.2 * len(panels), 3.4))
  axes = fig.subplots(1, len(panels), squeeze=False)
  for ax, (task, metric) in zip(axes[0], panels):
    scale = 1.0 if metric.startswith("hd95") else 100.0
    labels = {}
    for method, m in matrix["methods"].items():
      xs, ys, es = [], [], []
      for st in m["stages"]:
        res = st["tasks"].get(task)
        if res is None or not math.isfinite(res["mean"].get(metric, float("nan"))):
          continue
        xs.append(st["stage"])
        ys.append(scale * res["mean"][metric])
        es.append(scale * res["std"].get(metric, 0.0))
        labels.setdefault(st["stage"], f"{st['stage']}\n{st['modality']}")
      ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    ax.set_xticks(sorted(labels), [labels[k] for k in sorted(labels)])
    ax.set_xlabel("pre-training stage")
    ax.set_ylabel(metric.upper() + ("" if scale == 1.0 else " (%)"))
    ax.set_title(DISPLAY_NAMES.get(task, task))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  with io_utils.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=120)


def write_matrix(workdir: str | os.PathLike, matrix: Mapping[str, Any],
                 metrics: Sequence[str] = ()) -> dict[str, str]:
  """forgetting.json, forgetting.csv and forgetting.png, atomically; returns their paths."""
  workdir = os.fspath(workdir)
  paths = {n: os.path.join(workdir, n) for n in (FORGETTING_JSON, FORGETTING_CSV, FORGETTING_PNG)}
  io_utils.atomic_write_json(paths[FORGETTING_JSON], matrix)
  io_utils.atomic_write(paths[FORGETTING_CSV], matrix_csv(matrix))
  plot_matrix(matrix, paths[FORGETTING_PNG], metrics)
  return paths
