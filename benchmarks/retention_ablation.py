r"""Ablations of one continual method on the retention benchmark, against the baseline runs of a finished benchmark.

Every variant is the benchmark with `--methods` (default seqssl, invcoss) and a few overrides. The baseline
method's runs and measurements and the random-init measurements are copied from `--base` (a finished
`configs/retention.py` workdir), so only the ablated method trains; its first stage is shared with the copied
baseline's as in the benchmark itself. Writes `<out>/ablation.json` and `<out>/ablation.md`.

  python benchmarks/retention_ablation.py --base=workdirs/retention_quick --out=workdirs/ablation \
      --variant='paper:continual.invert_with="own",inversion.grey="no"' \
      --variant='grey:inversion.grey="yes"' --variant='noise:inversion.schedule_2d.init_steps=1,inversion.schedule_2d.steps=1'

A variant is `name:key=value,key=value` (values are Python literals; keys are config paths). `--preset` picks the
configs/retention.py preset (default quick). `--keep=er,noise,cassle` copies those methods' runs too, so the
variant's summary pairs the ablated method with each of them (AVG, the content ratio, the judges):

  python benchmarks/retention_ablation.py --preset=content --base=workdirs/retention_content \
      --out=workdirs/ablation_content --keep=er,noise,cassle \
      --variant='priors:inversion.pixel_statistics=True,inversion.loss_weights.pixel=10.0,...'
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_variant(text: str) -> tuple[str, dict]:
  name, sep, body = text.partition(":")
  if not sep or not name:
    raise ValueError(f"--variant {text!r}: expected 'name:key=value,...'")
  overrides = {}
  if body.strip():
    # Split on commas that start a new key=value (values may be tuples with commas).
    parts, depth, cur = [], 0, ""
    for ch in body:
      depth += ch in "([{"
      depth -= ch in ")]}"
      if ch == "," and depth == 0:
        parts.append(cur)
        cur = ""
      else:
        cur += ch
    parts.append(cur)
    for p in parts:
      key, eq, value = p.partition("=")
      if not eq:
        raise ValueError(f"--variant {text!r}: {p!r} is not key=value")
      try:
        overrides[key.strip()] = ast.literal_eval(value.strip())
      except (ValueError, SyntaxError) as e:
        raise ValueError(f"--variant {text!r}: the value of {key.strip()!r} is not a Python literal: {value!r}") from e
  return name, overrides


def seed_workdir(base: str, out: str, baseline: str, seeds) -> None:
  """Copies the baseline's runs and measurements and the random-init measurements of `base` into `out`."""
  for s in seeds:
    for src, dst in ((os.path.join(base, "runs", f"seed_{s}", baseline), os.path.join(out, "runs", f"seed_{s}", baseline)),
                     (os.path.join(base, "measurements", f"seed_{s}", baseline),
                      os.path.join(out, "measurements", f"seed_{s}", baseline))):
      if not os.path.isdir(src):
        raise FileNotFoundError(f"{src} not found: --base must be a finished retention workdir with {baseline!r} runs")
      if not os.path.exists(dst):
        shutil.copytree(src, dst)
    r = os.path.join(base, "measurements", f"seed_{s}", "random.json")
    os.makedirs(os.path.join(out, "measurements", f"seed_{s}"), exist_ok=True)
    shutil.copy2(r, os.path.join(out, "measurements", f"seed_{s}", "random.json"))


def row(name: str, overrides: dict, s: dict, method: str, keep=()) -> dict:
  h, b = s["headline"], s["baseline"]
  first_task = next(iter(s["forgetting"][method]))
  last_task = next(t for t, i in s["tasks"].items() if i["stage"] == s["stages"][-1])
  out = dict(variant=name, overrides=overrides, method=method,
             forgetting=s["forgetting"][method][first_task][h], baseline_forgetting=s["forgetting"][b][first_task][h],
             avoided=s["avoided"][method][first_task][h],
             final_first_task=s["curves"][method][first_task][h][-1],
             last_task=s["curves"][method][last_task][h][-1], baseline_last_task=s["curves"][b][last_task][h][-1],
             cka=s["cka"][method][s["stages"][0]])
  rep = s["replay"].get(method, {}).get(s["stages"][0])
  if rep:
    out["frechet"] = rep["replay"]["frechet"]
    out["frechet_real"] = rep["real_same_size"]["frechet"]
    out["frechet_init"] = rep.get("generator_init", {}).get("frechet")
  if rep and "judges" in rep:
    out["judges"] = rep["judges"]
  out["tasks"] = (first_task, last_task)
  out["paired_vs"] = {m: s.get("paired", {}).get(f"{method}-{m}") for m in (b,) + tuple(keep)}
  out["avg"] = s.get("avg", {}).get(method)
  out["ratio"] = s.get("ratio")
  out["recon"] = s.get("recon", {}).get(method)
  return out


def paired_difference(base: str, workdir: str, method: str, seeds, stages, tasks, headline: str) -> dict:
  """Per-seed differences variant - base of the ablated method (the same seeds share stage 1, so the pairing
  removes the seed-to-seed spread of the levels): the first task after the last stage, the last task, and the
  replay set's Fréchet distance."""
  from invcoss_jax.retention.metrics import mean_ci

  def load(root, s, stage):
    path = os.path.join(root, "measurements", f"seed_{s}", method, f"{stage}.json")
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      return json.load(f)

  out = {}
  first, last = tasks
  diffs = {"first_task": [], "last_task": [], "frechet": []}
  for s in seeds:
    a, b = load(workdir, s, stages[-1]), load(base, s, stages[-1])
    if a is None or b is None:
      return {}
    diffs["first_task"].append(a["tasks"][first][headline] - b["tasks"][first][headline])
    diffs["last_task"].append(a["tasks"][last][headline] - b["tasks"][last][headline])
    ra, rb = (load(workdir, s, stages[0]) or {}).get("replay"), (load(base, s, stages[0]) or {}).get("replay")
    if ra and rb:
      diffs["frechet"].append(ra["replay"]["frechet"] - rb["replay"]["frechet"])
  for k, v in diffs.items():
    if v:
      out[k] = mean_ci(v)
  return out


def markdown(rows: list[dict], headline: str) -> str:
  from invcoss_jax.retention.report import fmt
  t0, t1 = rows[0]["tasks"]
  lines = [f"| variant | {t0} {headline} forgetting | avoided (of means / per seed) | {t0} {headline} after last | "
           f"{t1} {headline} (plasticity) | CKA | FD replay | FD real same N | FD generator init |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    av = r["avoided"]
    lines.append(f"| {r['variant']} | {fmt(r['forgetting'])} | {av['of_means']:.2f} / {fmt(av['per_seed'], 2)} | "
                 f"{fmt(r['final_first_task'])} | {fmt(r['last_task'])} | {fmt(r['cka'])} | "
                 f"{fmt(r.get('frechet'), 2)} | {fmt(r.get('frechet_real'), 2)} | {fmt(r.get('frechet_init'), 2)} |")
  b = rows[0]
  lines.append(f"| baseline (seqssl) | {fmt(b['baseline_forgetting'])} | 0 | - | "
               f"{fmt(b['baseline_last_task'])} | - | - | - | - |")
  lines += ["", f"Paired per seed, variant minus the benchmark's own {rows[0]['method']} run (same seeds, same stage 1):",
            "", f"| variant | Δ {t0} {headline} after last | Δ {t1} {headline} | Δ FD replay |", "|---|---|---|---|"]
  for r in rows:
    d = r.get("paired", {})
    lines.append(f"| {r['variant']} | {fmt(d.get('first_task'))} | {fmt(d.get('last_task'))} | "
                 f"{fmt(d.get('frechet'), 2)} |")
  if any(r.get("paired_vs") and any(r["paired_vs"].values()) for r in rows):
    lines += ["", f"Paired per seed within the variant's benchmark: the ablated method minus each other method "
              f"(the first task's {headline} after the last stage; AVG over every task after the last stage):", "",
              "| variant | vs | Δ first task | Δ AVG | Δ re-fitted MAE error, stage 1 |", "|---|---|---|---|---|"]
    for r in rows:
      for m, d in (r.get("paired_vs") or {}).items():
        if d:
          lines.append(f"| {r['variant']} | {m} | {fmt(d.get('first_task'))} | {fmt(d.get('avg'))} | "
                       f"{fmt(d.get('mae_mse_refit'), 4)} |")
  judged = [r for r in rows if r.get("judges")]
  if judged:
    lines += ["", "Independent judges of the ablated method's stage-1 replay set (two-sample AUC against held-out "
              "real images; smoothed noise and real vs real are the anchors):", "",
              "| variant | C2ST pixels | C2ST pixel statistics | C2ST CNN | KID | coverage | noise anchor (pixels / "
              "statistics / CNN) |", "|---|---|---|---|---|---|---|"]
    for r in judged:
      j, a = r["judges"]["replay"], r["judges"].get("smoothed_noise", {})
      lines.append(f"| {r['variant']} | {fmt(j.get('c2st_logistic_auc'))} | {fmt(j.get('c2st_statistics_auc'))} | "
                   f"{fmt(j.get('c2st_cnn_auc'))} | {fmt(j.get('kid'), 4)} | {fmt(j.get('coverage'))} | "
                   f"{fmt(a.get('c2st_logistic_auc'))} / {fmt(a.get('c2st_statistics_auc'))} / "
                   f"{fmt(a.get('c2st_cnn_auc'))} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--base", required=True, help="a finished retention workdir holding the baseline's runs")
  p.add_argument("--out", required=True)
  p.add_argument("--preset", default="quick")
  p.add_argument("--method", default="invcoss", help="the ablated method")
  p.add_argument("--variant", action="append", required=True, help="name:key=value,...")
  p.add_argument("--keep", default="", help="comma-separated methods whose runs are copied from --base as well")
  args = p.parse_args(argv)

  from absl import logging
  logging.set_verbosity(logging.INFO)
  from invcoss_jax.defaults import load_config_file
  from invcoss_jax.jobs import retention as job

  rows = []
  variants = [parse_variant(v) for v in args.variant]
  for name, overrides in variants:
    config = load_config_file(f"configs/retention.py:{args.preset}")
    baseline = str(config.retention.baseline)
    keep = tuple(m for m in args.keep.split(",") if m and m not in (baseline, args.method))
    config.retention.methods = (baseline,) + keep + (args.method,)
    for key, value in overrides.items():
      node, *path = key.split(".")
      target = config
      for k in [node] + path[:-1]:
        if k not in target:
          raise KeyError(f"--variant {name}: config has no {key!r}")
        target = target[k]
      if path[-1:] and path[-1] not in target:
        raise KeyError(f"--variant {name}: config has no {key!r}")
      target[path[-1] if path else node] = value
    workdir = os.path.join(os.path.abspath(args.out), name)
    for m in (baseline,) + keep:
      seed_workdir(os.path.abspath(args.base), workdir, m, [int(s) for s in config.retention.seeds])
    s = job.run(config, workdir)
    r = row(name, overrides, s, args.method, keep)
    r["paired"] = paired_difference(os.path.abspath(args.base), workdir, args.method, s["seeds"], s["stages"],
                                    r["tasks"], s["headline"])
    rows.append(r)
    from invcoss_jax.io_utils import atomic_write, atomic_write_json
    atomic_write_json(os.path.join(args.out, "ablation.json"), rows)
    atomic_write(os.path.join(args.out, "ablation.md"), markdown(rows, s["headline"]))
  print(open(os.path.join(args.out, "ablation.md")).read())
  return 0


if __name__ == "__main__":
  sys.exit(main())
