"""The `evaluate` and `forgetting` jobs (config.mode), what `main.py` runs.

evaluate: fine-tunes `config.init_from` (a trained stage's workdir; empty = from scratch) on
  `config.evaluate.task` once per seed and writes `seed_<s>/metrics.json`, `results.json`,
  `results.csv` and `results.md` (Table 1 layout). A rerun on the same workdir reuses the seeds
  already finished with the same settings.
forgetting: the same for every stage of one or more continual runs on every configured task, then
  the stage x task matrix (`forgetting.json`, `.csv`, `.png`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_collections
from absl import logging

from invcoss_jax import io_utils, workdir as workdir_lib
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.data import registry as data_registry, tokenization
from invcoss_jax.evaluate import finetune as finetune_lib, forgetting as forgetting_lib, report
from invcoss_jax.evaluate.config import task_config
from invcoss_jax.privacy import accounting as privacy_accounting
from invcoss_jax.train import checkpoint as ckpt_lib, vocabulary

SEED_METRICS = "metrics.json"
SEED_STARTED = "started.json"  # written when a seed starts: without metrics.json beside it, it was interrupted


def resolve_task(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`config.evaluate.tasks[name]` if present, else the task's defaults."""
  tasks = config.evaluate.get("tasks", None)
  if tasks is not None and name in tasks:
    return tasks[name]
  return task_config(name)


def load_backbone(config: ml_collections.ConfigDict, init_from: str) -> tuple[ml_collections.ConfigDict, Any]:
  """(model config, pre-trained MAE params or None). A checkpoint brings its own model config."""
  if init_from:
    stage_config, _, params = ckpt_lib.load_trained_stage(init_from)
    model_cfg = ml_collections.ConfigDict(stage_config.model.to_dict())
  else:
    model_cfg, params = ml_collections.ConfigDict(config.model.to_dict()), None
  if float(config.evaluate.drop_path) >= 0:
    model_cfg.drop_path = float(config.evaluate.drop_path)
  return model_cfg, params


def prepare_text_task(task: ml_collections.ConfigDict, name: str, model_cfg: ml_collections.ConfigDict,
                      workdir: str, pretrained: bool, stage_dir: str = ""
                      ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """A text task reads its ids with the vocabulary of the checkpoint's text tokenizer (config.model.tokenizer
  of the report stage), or its own `data.text.tokenizer`; from scratch, one trained on the task's training
  split into the workdir. The vocabulary must be the one the checkpoint in `stage_dir` recorded (its size and
  its token list: train/vocabulary.py). Returns copies of the task and model configs with both set."""
  task = ml_collections.ConfigDict(task.to_dict())
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  if not str(task.data.text.tokenizer or ""):
    task.data.text.tokenizer = str(model_cfg.get("tokenizer", "") or "")
  if pretrained and not str(task.data.text.tokenizer):
    raise ConfigError(f"config.evaluate.tasks.{name}: the checkpoint has no text tokenizer (config.model.tokenizer "
                      "is empty: it never trained a report stage); set data.text.tokenizer to its vocabulary")
  task.data.text.tokenizer = str(tokenization.ensure_tokenizer(task.data, workdir).text.tokenizer)
  if pretrained and stage_dir:
    vocabulary.check(stage_dir, str(task.data.text.tokenizer), f"fine-tuning it on {name}")
  fields = tokenization.model_text_fields(str(task.data.text.tokenizer))
  if pretrained and int(model_cfg.get("vocab_size", 0)) != fields["vocab_size"]:
    raise vocabulary.VocabularyError(
        str(task.data.text.tokenizer), f"has {fields['vocab_size']} tokens, the text embedding of the checkpoint "
        f"(config.evaluate.tasks.{name}) {model_cfg.get('vocab_size', 0)}: use the pre-training vocabulary")
  model_cfg.update(fields)
  return task, model_cfg


def check_config(config: ml_collections.ConfigDict) -> None:
  """The tasks, seeds and checkpoints an `evaluate` or `forgetting` run names, before anything is written."""
  if str(config.mode) == "forgetting":
    runs = forgetting_lib.parse_runs(list(config.evaluate.forgetting.runs), str(config.init_from or ""))
    for _, path in runs:
      forgetting_lib.find_stages(path)
    tasks = [str(t) for t in (config.evaluate.forgetting.tasks or (config.evaluate.task,))]
  else:
    if str(config.init_from or ""):
      workdir_lib.check_stage_workdir(str(config.init_from))
    tasks = [str(config.evaluate.task)]
  for name in tasks:
    finetune_lib.check_task(resolve_task(config, name), name)


def _checkpoint_steps(init_from: str) -> list[int]:
  """The stage's checkpoint steps: results of an earlier, shorter run of the stage are not reused."""
  folder = os.path.join(init_from, ckpt_lib.CHECKPOINT_DIR) if init_from else ""
  if not folder or not os.path.isdir(folder):
    return []
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def _fingerprint(*parts: Any) -> str:
  blob = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_finetuner(config: ml_collections.ConfigDict, task_name: str,
                   model_cfg: ml_collections.ConfigDict) -> finetune_lib.Finetuner:
  return finetune_lib.Finetuner(resolve_task(config, task_name), task_name, model_cfg,
                                protocol=str(config.evaluate.protocol), mesh_cfg=config.mesh,
                                max_steps=int(config.total_steps),
                                batch_shards=bool(config.evaluate.batch_shards), privacy=config.get("privacy"))


def evaluate_task(config: ml_collections.ConfigDict, task_name: str, workdir: str | os.PathLike, *,
                  init_from: str, method: str, backbone: tuple | None = None,
                  finetuners: dict | None = None) -> dict[str, Any]:
  """Fine-tunes `init_from` on one task for every seed in `workdir`; returns the results record.

  `finetuners` caches the compiled fine-tuning per (task, model config) across calls.
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  task = resolve_task(config, task_name)
  protocol = str(config.evaluate.protocol)
  model_cfg, pretrained = backbone if backbone is not None else load_backbone(config, init_from)
  if data_registry.is_text(task.data):
    task, model_cfg = prepare_text_task(task, task_name, model_cfg, workdir, pretrained is not None,
                                        stage_dir=init_from)
    config = ml_collections.ConfigDict(config.to_dict())
    config.evaluate.tasks[task_name] = task
  cap = int(config.total_steps)
  finetuners = {} if finetuners is None else finetuners
  per_seed: dict[int, dict[str, float]] = {}
  details: dict[str, Any] = {}
  # DP fine-tuning (config.privacy on) is another setting; off, the fingerprint is the one it always was.
  dp = [config.privacy.to_dict()] if privacy_accounting.enabled(config.get("privacy")) else []
  for seed in config.evaluate.seeds:
    seed = int(seed)
    fp = _fingerprint(task.to_dict(), protocol, model_cfg.to_dict(), os.path.abspath(init_from) if init_from
                      else "", _checkpoint_steps(init_from), seed, cap, float(config.evaluate.drop_path), *dp)
    path = os.path.join(workdir, f"seed_{seed}", SEED_METRICS)
    if os.path.exists(path):
      with open(path) as f:
        done = json.load(f)
      if done.get("fingerprint") == fp:
        logging.info("%s: seed %d already evaluated in %s", task_name, seed, path)
        per_seed[seed] = done["test"]
        details[str(seed)] = {k: done[k] for k in ("best_step", "total_steps")}
        continue
      logging.info("%s: %s was written with other settings; evaluating again", task_name, path)
    started = os.path.join(workdir, f"seed_{seed}", SEED_STARTED)
    if os.path.exists(started) and not os.path.exists(path):
      # Fine-tuning keeps no checkpoints (a seed takes minutes): a seed cut short starts again.
      logging.warning("%s: seed %d was interrupted earlier; fine-tuning it again from its first step", task_name, seed)
    io_utils.atomic_write_json(started, dict(fingerprint=fp))
    key = (task_name, model_cfg.to_json())
    if key not in finetuners:
      finetuners[key] = make_finetuner(config, task_name, model_cfg)
    res = finetuners[key].run(seed, pretrained, init_from)
    if res.privacy is not None:  # the same for every seed: one privacy.json per task
      privacy_accounting.write_ledger(workdir, res.privacy)
    io_utils.atomic_write_json(path, dict(fingerprint=fp, task=task_name, seed=seed, test=res.test,
                                          best_val=res.best_val, best_step=res.best_step,
                                          total_steps=res.total_steps, history=res.history,
                                          loaded=res.loaded, **({} if res.privacy is None else
                                                                {"privacy": res.privacy})))
    per_seed[seed] = res.test
    details[str(seed)] = dict(best_step=res.best_step, total_steps=res.total_steps)
  extra: dict[str, Any] = dict(selection=details)
  ledger = privacy_accounting.read_ledger(workdir) if dp else None
  if ledger is not None:  # DP fine-tuning: its guarantee beside the results
    extra["privacy"] = {k: ledger[k] for k in ("epsilon", "delta", "noise_multiplier", "sampling_rate", "steps",
                                               "clip_norm", "accountant")}
  record = report.make_record(task=task_name, kind=str(task.kind), method=method, protocol=protocol,
                              init_from=init_from, per_seed=per_seed, extra=extra)
  report.write_results(workdir, record)
  return record


def default_method_name(config: ml_collections.ConfigDict) -> str:
  if config.evaluate.method_name:
    return str(config.evaluate.method_name)
  return os.path.basename(os.path.normpath(config.init_from)) if config.init_from else "TFS"


def run_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """mode='evaluate': the results record (also written to `workdir`)."""
  workdir = os.fspath(workdir)
  init_from = str(config.init_from or "")
  backbone = load_backbone(config, init_from)  # the checkpoint read before the run is recorded
  os.makedirs(workdir, exist_ok=True)
  ckpt_lib.write_config(workdir, config)
  return evaluate_task(config, str(config.evaluate.task), workdir, init_from=init_from,
                       method=default_method_name(config), backbone=backbone)


def run_forgetting(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """mode='forgetting': every stage of every run in `config.evaluate.forgetting.runs` on every task of
  `config.evaluate.forgetting.tasks`; returns the matrix (also written to `workdir`)."""
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  ckpt_lib.write_config(workdir, config)
  runs = forgetting_lib.parse_runs(list(config.evaluate.forgetting.runs), str(config.init_from or ""))
  tasks = [str(t) for t in (config.evaluate.forgetting.tasks or (config.evaluate.task,))]
  kinds = {t: str(resolve_task(config, t).kind) for t in tasks}
  stages_of = {method: forgetting_lib.find_stages(path) for method, path in runs}  # fail before training
  matrix: dict[str, Any] = dict(tasks=tasks, kinds=kinds, seeds=[int(s) for s in config.evaluate.seeds],
                                protocol=str(config.evaluate.protocol), methods={})
  finetuners: dict = {}  # compiled once per task and architecture, shared by every stage and run
  for method, path in runs:
    stages = []
    for k, modality, stage_dir in stages_of[method]:
      backbone = load_backbone(config, stage_dir)
      entry = dict(stage=k, modality=modality, workdir=stage_dir, tasks={})
      for task in tasks:
        out = os.path.join(workdir, forgetting_lib.safe_name(method), os.path.basename(stage_dir), task)
        rec = evaluate_task(config, task, out, init_from=stage_dir, method=method, backbone=backbone,
                            finetuners=finetuners)
        entry["tasks"][task] = dict(mean=rec["mean"], std=rec["std"])
      stages.append(entry)
    matrix["methods"][method] = dict(workdir=path, stages=stages)
  forgetting_lib.write_matrix(workdir, matrix, tuple(config.evaluate.forgetting.metrics))
  return matrix
