"""What a workdir holds (`workdir.json`), so that another job cannot reuse it by mistake.

A run restarted on its own workdir resumes; a run of another mode, modality, model, sequence or task in it
would resume or overwrite the wrong thing (a pathology config "resuming" a finished X-ray stage, an evaluation
replacing a stage's config.json). `claim` refuses that before anything is written, naming both, unless
`config.overwrite_workdir` asks to delete the old run first. `stats` and `invert` add to the workdir of a
pre-training stage of the same model without changing what it is. A workdir from before `workdir.json`
existed is identified by its config.json.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Any

import ml_collections

from invcoss_jax import io_utils
from invcoss_jax.config_checks import ConfigError

IDENTITY_FILE = "workdir.json"
CONFIG_FILE = "config.json"
SYNTHETIC_DIR = "synthetic"  # a stage's synthetic set (npz shards, key `images`), written by inversion

# Modes that may write into the workdir of another mode's run (and keep its identity).
ATTACHED = {"stats": ("pretrain",), "invert": ("pretrain",)}


class WorkdirError(ConfigError):
  """The workdir cannot be used for this run (another run's, a file, not writable)."""


# Model options a run derives from its data (the report stage sets them from its tokenizer), not chosen by it.
_DERIVED_MODEL_KEYS = ("vocab_size", "pad_id", "tokenizer")


def _model_options(model: ml_collections.ConfigDict) -> dict[str, Any]:
  d = json.loads(model.to_json_best_effort()) if hasattr(model, "to_json_best_effort") else dict(model)
  return {k: v for k, v in d.items() if k not in _DERIVED_MODEL_KEYS}


def _model_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """'key: old -> new' for the model options both record (an option added since the old run is no change)."""
  return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a run of `config` puts in its workdir: its mode and what makes its results its own."""
  mode = str(config.get("mode", "pretrain"))
  out: dict[str, Any] = {"mode": mode}
  if mode in ("pretrain", "stats", "continual", "retention", "compile") and "model" in config:
    out["model"] = _model_options(config.model)
  if mode in ("pretrain", "stats") and "data" in config:
    out["modality"] = str(config.data.get("modality", "") or _registered_modality(config.data))
  if mode in ("continual", "retention"):
    out["order"] = [str(m) for m in config.continual.order]
  if mode == "continual":
    out["method"] = str(config.continual.method)
  if mode in ("evaluate", "invert", "audit", "export_torch"):
    out["init_from"] = os.path.abspath(str(config.get("init_from", "") or "")) if config.get("init_from") else ""
  if mode == "evaluate":
    out["task"] = str(config.evaluate.task)
  return out


def _registered_modality(data_cfg) -> str:
  try:
    from invcoss_jax.data.registry import resolve  # pylint: disable=g-import-not-at-top
    return str(resolve(data_cfg).modality)
  except Exception:  # pylint: disable=broad-except  (the loader reports a bad data section itself)
    return ""


def _existing(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, IDENTITY_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      try:
        return json.load(f)
      except json.JSONDecodeError as e:
        raise WorkdirError(f"{path} is not valid JSON ({e}); it is written atomically, so it was edited by "
                           "hand: fix or delete it") from e
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      try:
        return identity(ml_collections.ConfigDict(json.load(f)))
      except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
        return None
  return None


def _describe(ident: dict[str, Any]) -> str:
  keys = ["mode"] + sorted(k for k in ident if k != "mode")
  show = lambda k: ident[k].get("preset", "custom") if k == "model" and isinstance(ident[k], dict) else ident[k]
  return ", ".join(f"{k}={show(k)}" for k in keys if k in ident)


def _conflict(old: dict[str, Any], new: dict[str, Any]) -> str | None:
  """Why `new` may not run where `old` ran, or None."""
  model = (_model_changes(old["model"], new["model"]) if isinstance(old.get("model"), dict)
           and isinstance(new.get("model"), dict) else [])
  if old.get("mode") != new["mode"]:
    if old.get("mode") in ATTACHED.get(new["mode"], ()):
      return f"its model differs ({'; '.join(model[:3])})" if model else None
    return f"it holds a {old.get('mode')!r} run and config.mode={new['mode']!r} would write over it"
  for k, v in new.items():
    if k == "model":
      if model:
        return f"its model differs ({'; '.join(model[:3])})"
    elif k in old and old[k] != v:
      return f"its {k} is {old[k]!r} where this run's is {v!r}"
  return None


def claim(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Checks that `workdir` can hold this run and records what it holds; raises WorkdirError otherwise."""
  workdir = os.path.abspath(os.fspath(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file: expected a directory (it is created if missing)")
  new = identity(config)
  old = _existing(workdir) if os.path.isdir(workdir) else None
  if old is not None:
    why = _conflict(old, new)
    if why and not bool(config.get("overwrite_workdir", False)):
      raise WorkdirError(f"--workdir={workdir} belongs to another run ({_describe(old)}): {why}. Use a new "
                         "--workdir, or --config.overwrite_workdir=True to delete that run and start afresh")
    if why:
      _delete_run(workdir)
      old = None
    elif new["mode"] != old.get("mode"):
      return  # stats / invert adding to a stage: the workdir stays the stage's
  try:
    os.makedirs(workdir, exist_ok=True)
    if old is None or not os.path.isfile(os.path.join(workdir, IDENTITY_FILE)):
      io_utils.atomic_write_json(os.path.join(workdir, IDENTITY_FILE), new)
  except OSError as e:
    raise WorkdirError(describe_os_error(e, f"--workdir={workdir}")) from e


def _delete_run(workdir: str) -> None:
  """Deletes the previous run of `workdir` (only a workdir this package wrote: it has workdir.json or
  config.json)."""
  for name in os.listdir(workdir):
    p = os.path.join(workdir, name)
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p)
    else:
      os.remove(p)


def describe_os_error(e: OSError, where: str) -> str:
  """One line for a file-system error: what, where, and what to do."""
  path = e.filename or where
  if e.errno == errno.ENOSPC:
    return (f"no space left on the device writing {path}: free space (or point --workdir elsewhere) and "
            "rerun; what was written before is intact and the run resumes")
  if e.errno in (errno.EACCES, errno.EPERM):
    return f"permission denied writing {path}: make {where} writable or choose another --workdir"
  if e.errno == errno.EROFS:
    return f"{path} is on a read-only file system: choose a writable --workdir"
  return f"cannot write {path} ({e.strerror or e}): check {where}"
