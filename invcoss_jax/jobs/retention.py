"""The `retention` job: does a continual method keep what earlier stages learnt? (paper Sec. 3.2, Fig. 6b)

For every seed and method of `config.retention`, the continual sequence of `config.continual` runs in
`workdir/runs/seed_<s>/<method>/` (the continual job itself: it resumes after a kill). After each of its stages
the stage's model is measured on held-out data of every stage (retention/evaluate.py): frozen-feature
probes where the data has labels, the drift from each earlier stage's own model (linear CKA and the relative
feature distance), the masked-reconstruction error on each earlier image stage (with the model's decoder and
with a re-fitted one), optional
fine-tuning with a small label budget, and, for the replay methods, the quality of what the stage left for
later stages (Fréchet distance in the stage encoder's feature space, diversity, nearest neighbours). Every
measurement is written atomically under `workdir/measurements/` as soon as it is made, so a restarted job
only measures what is missing. Summary (retention/summary.py): gain over a random-init encoder, forgetting, the
fraction of the baseline's forgetting avoided and drift, each a mean with a 95 % interval over seeds;
retention/report.py writes them as JSON, Markdown and plots.

`run(config, workdir)` is what `main.py` runs for config.mode = 'retention' (configs/retention.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

import ml_collections
from absl import logging

from invcoss_jax.config_checks import ConfigError, check_seeds
from invcoss_jax.continual import guard, methods as methods_lib, sequence as continual_job, text as text_lib
from invcoss_jax.continual.stages import STAGE_INFO, check_sequence, plan_stages, training_changes
from invcoss_jax.io_utils import atomic_write_json
from invcoss_jax.retention import evaluate, report, summary
from invcoss_jax.retention.config import run_config
from invcoss_jax.train.vocabulary import VOCAB_FILE

RUNS_DIR, MEASURE_DIR, VOCABULARY_DIR = "runs", "measurements", "vocabulary"


def with_vocabulary(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """With a report stage: one text vocabulary for every run and the measurements (trained once into
  `workdir/vocabulary/tokenizer.json`, or the configured file), so that seeds and methods differ in nothing
  else (two trainings of a WordPiece vocabulary on the same texts can differ, huggingface/tokenizers#1794)."""
  return text_lib.prepare_sequence(config, tuple(str(m) for m in config.continual.order),
                                   os.path.join(workdir, VOCABULARY_DIR))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Options are checked before any run starts (`jobs.run` calls this before it records the workdir)."""
  rc = config.retention
  methods = [str(m) for m in rc.methods]
  if not methods:
    raise ConfigError("config.retention.methods is empty: expected continual methods, e.g. ('seqssl', 'invcoss')")
  bad = [m for m in methods if m not in methods_lib.names()]
  if bad:
    raise ConfigError(f"config.retention.methods: {bad} are not continual methods; expected some of "
                      f"{list(methods_lib.names())}")
  if not any(methods_lib.get(m).sequential for m in methods):
    raise ConfigError("config.retention.methods: 'joint' (one stage over every modality) is only an upper bound; "
                      "name at least one sequential method too")
  if len(set(methods)) != len(methods):
    raise ConfigError(f"config.retention.methods lists a method twice: {methods}")
  for m in methods:  # config.privacy on: refused (real buffers; continual DP-SGD is not implemented yet)
    guard.check_privacy(config, methods_lib.get(m))
  seeds = check_seeds("config.retention.seeds", rc.seeds, distinct=True)
  if len(config.continual.order) < 2:
    raise ConfigError(f"config.continual.order={tuple(config.continual.order)}: retention needs two or more stages")
  j = rc.replay.judges
  if bool(j.enabled) and (int(j.folds) < 2 or int(j.cnn_steps) < 0 or int(j.judge_net_steps) < 0
                          or float(j.noise_sigma) < 0):
    raise ConfigError(f"config.retention.replay.judges: expected folds >= 2 and cnn_steps, judge_net_steps, "
                      f"noise_sigma >= 0, got folds={j.folds}, cnn_steps={j.cnn_steps}, "
                      f"judge_net_steps={j.judge_net_steps}, noise_sigma={j.noise_sigma}")
  for m in methods:  # each method's own checks (e.g. noise needs a generator), before any run writes anything
    check_sequence(run_config(config, seeds[0], m))
  for m in config.continual.order:
    path = str(config.continual.datasets[m].get("path", "") or "")
    if path and not os.path.exists(path):
      hint = (" (configs/retention.py:content's grey MRI slices: run `python scripts/build_mri_slices.py` first, "
              "or set $INVCOSS_MRI_SLICES)" if path.endswith("hippocampus_slices_32.npz") else "")
      raise ConfigError(f"config.continual.datasets.{m}.path={path!r} does not exist{hint}")
  if str(rc.fit_split) == str(rc.test_split):
    raise ConfigError(f"config.retention.fit_split and test_split are both {rc.fit_split!r}: the probes must be "
                     "scored on examples they were not fitted on")


def share_first_stage(source: str, target: str) -> bool:
  """Copies the trained first stage of run `source` (its config and checkpoints) into run `target`, so that
  target's continual job resumes it at its last step and only runs the method-specific end of the stage.
  Returns whether a copy was made (not when target already has the stage, or source has not finished it)."""
  names = sorted(n for n in os.listdir(source) if n.startswith("stage_1_")) if os.path.isdir(source) else []
  if not names or not os.path.isfile(os.path.join(source, names[0], STAGE_INFO)):
    return False
  src, dst = os.path.join(source, names[0]), os.path.join(target, names[0])
  if os.path.exists(dst):
    return False
  os.makedirs(target, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{names[0]}-", dir=target)
  try:
    shutil.copytree(os.path.join(src, "checkpoints"), os.path.join(tmp, "checkpoints"))
    shutil.copy2(os.path.join(src, "config.json"), os.path.join(tmp, "config.json"))
    if os.path.isfile(os.path.join(src, VOCAB_FILE)):  # the copied checkpoint's vocabulary goes with it
      shutil.copy2(os.path.join(src, VOCAB_FILE), os.path.join(tmp, VOCAB_FILE))
    os.replace(tmp, dst)  # the stage appears whole or not at all
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return True


class Progress:
  """Logs each unit of work with the elapsed time and an estimate of the time left: the units still to do of
  each kind times the mean time of that kind's units so far (a random-baseline unit takes seconds, a run
  minutes). Units found done by an earlier run are logged and not counted."""

  def __init__(self, todo: dict[str, int]):
    self.left = dict(todo)
    self.total, self.done, self.start = sum(todo.values()), 0, time.perf_counter()
    self.spent = {k: [] for k in todo}

  def eta(self) -> float:
    """Seconds left; nan while a kind with units left has none timed yet."""
    return sum(n * (sum(self.spent[k]) / len(self.spent[k]) if self.spent[k] else float("nan"))
               for k, n in self.left.items() if n)

  def skip(self, what: str) -> None:
    logging.info("retention: %s done earlier", what)

  def step(self, kind: str, what: str, seconds: float) -> None:
    self.done += 1
    self.left[kind] -= 1
    self.spent[kind].append(seconds)
    eta = self.eta()
    logging.info("retention [%d/%d] %s done in %.0f s; elapsed %.0f s, ETA %s", self.done, self.total, what,
                 seconds, time.perf_counter() - self.start,
                 f"{eta:.0f} s" if eta == eta else "unknown until a unit of each kind is timed")


# Options of the measurements kept under measurements/ (a changed one would mix old and new figures);
# methods and seeds may be added to a finished benchmark, and loading knobs change nothing measured.
_IGNORED = ("retention.methods", "retention.seeds")


def check_plan(config: ml_collections.ConfigDict, path: str) -> None:
  """Refuses to resume a benchmark whose measurements were made with other measurement options or data."""
  if not os.path.isfile(path):
    return
  with open(path) as f:
    old = json.load(f).get("config", {})
  new = json.loads(config.to_json_best_effort())
  changes = [c for c in training_changes({"retention": old.get("retention", {}), "data": old.get("continual", {}).get("datasets", {})},
                                         {"retention": new.get("retention", {}), "data": new.get("continual", {}).get("datasets", {})},
                                         prefixes=("retention.", "data."))
             if not c.startswith(_IGNORED)]
  if changes and not bool(config.overwrite_workdir):
    raise ConfigError(f"{os.path.dirname(path)} holds measurements made with other options ({'; '.join(changes[:5])}"
                      f"{'; ...' if len(changes) > 5 else ''}): use a new --workdir, or "
                      "--config.overwrite_workdir=True to measure again")
  if changes:
    shutil.rmtree(os.path.join(os.path.dirname(path), MEASURE_DIR), ignore_errors=True)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs (or resumes) the benchmark; returns the summary (also in workdir/retention.json)."""
  check_config(config)
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  config = with_vocabulary(config, workdir)
  rc = config.retention
  methods, seeds = [str(m) for m in rc.methods], [int(s) for s in rc.seeds]
  stage_names = [s.name for s in plan_stages(run_config(config, seeds[0], methods[0]), workdir)]
  check_plan(config, os.path.join(workdir, "retention_plan.json"))
  atomic_write_json(os.path.join(workdir, "retention_plan.json"),
                    dict(methods=methods, seeds=seeds, stages=stage_names, config=config.to_dict()))
  measurer = evaluate.Measurer(config, os.path.join(workdir, MEASURE_DIR))
  runs = {(seed, method): plan_stages(run_config(config, seed, method),
                                     os.path.join(workdir, RUNS_DIR, f"seed_{seed}", method))
          for seed in seeds for method in methods}
  todo_random = [s for s in seeds if not measurer.has_random(s)]
  todo_runs = [k for k, stages in runs.items() if not measurer.has_run(k[0], k[1], stages)]
  progress = Progress({"random": len(todo_random), "run": len(todo_runs)})
  for seed in seeds:
    t0 = time.perf_counter()
    measurer.random_baseline(seed)
    what = f"seed {seed}: random-init encoder"
    if seed in todo_random:
      progress.step("random", what, time.perf_counter() - t0)
    else:
      progress.skip(what)
    first = None
    for method in methods:
      t0 = time.perf_counter()
      run_dir = os.path.join(workdir, RUNS_DIR, f"seed_{seed}", method)
      cfg = run_config(config, seed, method)
      stages = runs[(seed, method)]
      finished = all(os.path.isfile(os.path.join(s.workdir, STAGE_INFO)) for s in stages)
      sequential = methods_lib.get(method).sequential  # joint's one stage is not anyone's first stage
      if not finished and bool(rc.share_first_stage) and first is not None and sequential:
        if share_first_stage(first, run_dir):
          logging.info("retention: %s (seed %d) starts from the first stage trained by %s", method, seed,
                       os.path.basename(first))
      continual_job.run(cfg, run_dir)
      if sequential:
        first = first or run_dir
      measurer.measure_run(seed, method, stages)
      what = f"seed {seed}: {method}"
      if (seed, method) in todo_runs:
        progress.step("run", what, time.perf_counter() - t0)
      else:
        progress.skip(what)
  result = summary.summarize(config, measurer.load_all(seeds, methods, stage_names), stage_names)
  report.write(workdir, config, result, measurer)
  return result
