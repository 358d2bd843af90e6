"""Results of a downstream evaluation: per-seed metrics, mean and std, and the paper's Table 1 layout.

Metric values are stored as fractions (acc, auc, f1, dsc) and distances (hd95 in voxels, hd95_mm in
mm); the Markdown table shows higher-is-better metrics in percent as the paper does. AVG up is the
mean of a row's higher-is-better cells (percent), AVG down the mean of its HD cells (HD95 in voxels,
as MedCoSS and the paper report). Std is the population std over seeds (ddof=0).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from invcoss_jax import io_utils
from invcoss_jax.evaluate.config import CLASSIFICATION, DISPLAY_NAMES, SEGMENTATION

RESULTS_JSON, RESULTS_CSV, RESULTS_MD = "results.json", "results.csv", "results.md"
# (column title, metric key, higher is better) per task kind, in the paper's column order.
TABLE_COLUMNS = {
    CLASSIFICATION: (("ACC", "acc", True), ("AUC", "auc", True), ("F1", "f1", True)),
    SEGMENTATION: (("DSC", "dsc", True), ("HD", "hd95", False)),
}
HEADLINE_METRIC = {CLASSIFICATION: "acc", SEGMENTATION: "dsc"}


def summarize(per_seed: Mapping[Any, Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
  """(mean, std) over seeds of every metric; NaN values (e.g. an undefined AUC) are left out."""
  if not per_seed:
    raise ValueError("summarize: no seeds")
  keys = sorted(set().union(*(m.keys() for m in per_seed.values())))
  mean, std = {}, {}
  for k in keys:
    vals = np.array([m[k] for m in per_seed.values() if k in m], np.float64)
    vals = vals[np.isfinite(vals)]
    mean[k] = float(vals.mean()) if vals.size else float("nan")
    std[k] = float(vals.std()) if vals.size else float("nan")
  return mean, std


def make_record(*, task: str, kind: str, method: str, protocol: str, init_from: str,
                per_seed: Mapping[int, Mapping[str, float]], extra: Mapping[str, Any] | None = None) -> dict:
  """The content of results.json."""
  mean, std = summarize(per_seed)
  record = dict(task=task, kind=kind, method=method, protocol=protocol, init_from=init_from,
                seeds=[int(s) for s in per_seed], per_seed={str(s): dict(m) for s, m in per_seed.items()},
                mean=mean, std=std,
                units=dict(acc="fraction", auc="fraction", f1="fraction", dsc="fraction", hd95="voxels",
                           hd95_mm="mm"))
  if extra:
    record.update(extra)
  return record


def results_csv(records: Sequence[Mapping[str, Any]]) -> str:
  """One row per (method, task, metric): mean, std, number of seeds, then the per-seed values."""
  seeds = sorted({int(s) for r in records for s in r["per_seed"]})
  out = io.StringIO()
  w = csv.writer(out, lineterminator="\n")
  w.writerow(["method", "task", "kind", "metric", "mean", "std", "n_seeds"] + [f"seed_{s}" for s in seeds])
  for r in records:
    for metric in sorted(r["mean"]):
      per = [r["per_seed"].get(str(s), {}).get(metric, "") for s in seeds]
      w.writerow([r["method"], r["task"], r["kind"], metric, _num(r["mean"][metric]), _num(r["std"][metric]),
                  len(r["per_seed"])] + [_num(v) if v != "" else "" for v in per])
  return out.getvalue()


def _num(v: float) -> str:
  return "nan" if (isinstance(v, float) and math.isnan(v)) else repr(float(v))


def _display(task: str) -> str:
  return DISPLAY_NAMES.get(task, task)


def table1_markdown(records: Iterable[Mapping[str, Any]], *, tasks: Sequence[str] | None = None,
                    methods: Sequence[str] | None = None, highlight: bool = True) -> str:
  """Markdown table laid out like the paper's Table 1: one row per method, for each task its metric
  columns (ACC AUC F1 or DSC HD), then AVG up and AVG down. Best per column in bold, second-best
  underlined (when there are at least two methods)."""
  records = list(records)
  if not records:
    raise ValueError("table1_markdown: no results")
  kinds: dict[str, str] = {}
  for r in records:
    if kinds.setdefault(r["task"], r["kind"]) != r["kind"]:
      raise ValueError(f"task {r['task']!r} appears as both {kinds[r['task']]} and {r['kind']}")
  tasks = list(tasks) if tasks else list(dict.fromkeys(r["task"] for r in records))
  methods = list(methods) if methods else list(dict.fromkeys(r["method"] for r in records))
  by_key = {(r["method"], r["task"]): r for r in records}
  columns = [(t, title, key, hib) for t in tasks for title, key, hib in TABLE_COLUMNS[kinds[t]]]

  values: dict[str, list[float]] = {}
  for m in methods:
    row = []
    for t, _, key, hib in columns:
      r = by_key.get((m, t))
      v = float(r["mean"].get(key, float("nan"))) if r else float("nan")
      row.append(v * 100.0 if hib else v)
    ups = [v for v, c in zip(row, columns) if c[3] and math.isfinite(v)]
    downs = [v for v, c in zip(row, columns) if not c[3] and math.isfinite(v)]
    row.append(float(np.mean(ups)) if ups else float("nan"))
    row.append(float(np.mean(downs)) if downs else float("nan"))
    values[m] = row
  higher = [c[3] for c in columns] + [True, False]

  def rank_marks(j):
    col = {m: values[m][j] for m in methods if math.isfinite(values[m][j])}
    if not highlight or len(col) < 2:
      return {}
    distinct = sorted(set(col.values()), reverse=higher[j])  # ties share a rank
    names = dict(zip(distinct[:2], ("best", "second")))
    return {m: names[v] for m, v in col.items() if v in names}

  marks = [rank_marks(j) for j in range(len(higher))]
  header = ["Method"] + [f"{_display(t)} {title}" for t, title, _, _ in columns] + ["AVG ↑", "AVG ↓"]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
  for m in methods:
    cells = [m]
    for j, v in enumerate(values[m]):
      s = "–" if not math.isfinite(v) else f"{v:.2f}"
      mark = marks[j].get(m)
      s = f"**{s}**" if mark == "best" else (f"<u>{s}</u>" if mark == "second" else s)
      cells.append(s)
    lines.append("| " + " | ".join(cells) + " |")
  notes = ("ACC, AUC, F1 and DSC in %; HD is HD95 in voxels. AVG ↑ averages the higher-is-better "
           "columns, AVG ↓ the HD columns. Means over seeds.")
  return "\n".join(lines) + "\n\n" + notes + "\n"


def results_markdown(record: Mapping[str, Any]) -> str:
  """results.md of one evaluation: the Table 1 row, then mean ± std of every metric."""
  title = f"# {_display(record['task'])}: {record['method']} ({record['protocol']}, seeds {record['seeds']})\n\n"
  lines = ["| metric | mean | std |", "|:---|---:|---:|"]
  for k in sorted(record["mean"]):
    lines.append(f"| {k} | {record['mean'][k]:.4f} | {record['std'][k]:.4f} |")
  return title + table1_markdown([record], highlight=False) + "\n" + "\n".join(lines) + "\n"


def write_results(workdir: str | os.PathLike, record: Mapping[str, Any]) -> dict[str, str]:
  """Writes results.json, results.csv and results.md atomically; returns their paths."""
  workdir = os.fspath(workdir)
  paths = {name: os.path.join(workdir, name) for name in (RESULTS_JSON, RESULTS_CSV, RESULTS_MD)}
  io_utils.atomic_write_json(paths[RESULTS_JSON], record)
  io_utils.atomic_write(paths[RESULTS_CSV], results_csv([record]))
  io_utils.atomic_write(paths[RESULTS_MD], results_markdown(record))
  return paths
