"""What a workdir holds (`workdir.json`), so that another job cannot reuse it by mistake.

A run restarted on its own workdir resumes; a run of another mode, modality, model, sequence or task in it
would resume or overwrite the wrong thing (a pathology config "resuming" a finished X-ray stage, an evaluation
replacing a stage's config.json). `claim` refuses that before anything is written, naming both, unless
`config.overwrite_workdir` asks to delete the old run first. `stats` and `invert` add to the workdir of a
pre-training stage of the same model without changing what it is. A workdir from before `workdir.json`
existed is identified by its config.json.

`claim` records the run only once the run was checked (options, the conflict above) and the workdir is locked
(`workdir_lock`, taken by `jobs.run`); a workdir that holds nothing but such a record (a run refused or failed
before it wrote anything) is not another run: the next run's record replaces it. `check_path` refuses, before
anything is created, a workdir path too long for the files a run writes under it.
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
from invcoss_jax.data.registry import resolve
from invcoss_jax.workdir_lock import LOCK_FILE

IDENTITY_FILE = "workdir.json"
CONFIG_FILE = "config.json"
SYNTHETIC_DIR = "synthetic"  # a stage's synthetic set (npz shards, key `images`), written by inversion

# Modes that may write into the workdir of another mode's run (and keep its identity).
ATTACHED = {"stats": ("pretrain",), "invert": ("pretrain",)}
# What a workdir holds before its run wrote anything: a record of it (and the lock) only.
_NO_WORK = {IDENTITY_FILE, LOCK_FILE}
# Characters the deepest file a run writes adds to its workdir's path: an orbax checkpoint's data file under
# a retention run's stage (runs/seed_<s>/<method>/stage_<k>_<m>/checkpoints/<step>.orbax-checkpoint-tmp-<time>/
# state/ocdbt.process_<i>/d/<32 hex>) is about 150; the rest is margin.
_PATH_ROOM = 300


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
    return str(resolve(data_cfg).modality)
  except Exception:  # pylint: disable=broad-except  (the loader reports a bad data section itself)
    return ""


def _existing(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, IDENTITY_FILE)
  if os.path.isfile(path):
    return io_utils.read_json(path, WorkdirError)
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


def check_path(workdir: str | os.PathLike) -> None:
  """Refuses a workdir that is a file, or whose path leaves no room for the files a run writes under it
  (a name longer than the file system's PC_NAME_MAX, a path that with a checkpoint's files would pass its
  PC_PATH_MAX), before anything is created: such a run would otherwise fail mid-way inside orbax."""
  workdir = os.path.abspath(os.fspath(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file: expected a directory (it is created if missing)")
  existing = workdir
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
  except (OSError, ValueError):  # a file system that does not say: the OS reports it when it happens
    return
  long_names = [p for p in workdir.split(os.sep) if len(p.encode()) > name_max]
  if long_names:
    raise WorkdirError(f"--workdir={workdir[:80]}...: the name {long_names[0][:40]!r}... is "
                       f"{len(long_names[0].encode())} bytes; the file system allows {name_max} (PC_NAME_MAX): "
                       "choose a shorter --workdir")
  if len(workdir.encode()) + _PATH_ROOM > path_max:
    raise WorkdirError(f"--workdir={workdir[:80]}... is {len(workdir.encode())} bytes long: with the files a run "
                       f"writes under it (up to {_PATH_ROOM} more: orbax checkpoints, stages) it would pass the "
                       f"file system's limit of {path_max} (PC_PATH_MAX); choose a shorter --workdir")


def _holds_work(workdir: str) -> bool:
  return any(name not in _NO_WORK for name in os.listdir(workdir))


def check(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Refuses the run, writing nothing, when `workdir` holds another run (see `claim`)."""
  workdir = os.path.abspath(os.fspath(workdir))
  check_path(workdir)
  if not os.path.isdir(workdir):
    return
  old = _existing(workdir)
  why = _conflict(old, identity(config)) if old is not None else None
  if why and _holds_work(workdir) and not bool(config.get("overwrite_workdir", False)):
    raise WorkdirError(f"--workdir={workdir} belongs to another run ({_describe(old)}): {why}. Use a new "
                       "--workdir, or --config.overwrite_workdir=True to delete that run and start afresh")


def claim(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Checks that `workdir` can hold this run and records what it holds; raises WorkdirError otherwise."""
  workdir = os.path.abspath(os.fspath(workdir))
  check(workdir, config)
  new = identity(config)
  old = _existing(workdir) if os.path.isdir(workdir) else None
  if old is not None:
    why = _conflict(old, new)
    if why and _holds_work(workdir):  # `check` let it through: config.overwrite_workdir
      _delete_run(workdir)
      old = None
    elif why:  # a record of a run that wrote nothing (refused or failed at once): replaced
      old = None
      os.remove(os.path.join(workdir, IDENTITY_FILE))
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
  config.json). The lock file stays: this run holds it (see workdir_lock)."""
  for name in os.listdir(workdir):
    if name == LOCK_FILE:
      continue
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
  if e.errno == errno.EFBIG:
    return (f"the file {path} grew beyond what the file system (or the process's file size limit, ulimit -f) "
            "allows: raise the limit or choose another --workdir, and rerun; the run resumes")
  if e.errno == errno.ENAMETOOLONG:
    return f"the file name {str(path)[:120]}... is too long for the file system: choose a shorter --workdir"
  return f"cannot write {path} ({e.strerror or e}): check {where}"


def _stage_folders(root: str) -> list[str]:
  """The `stage_<k>_<modality>` folders of a continual run's workdir, by k."""
  import re  # pylint: disable=g-import-not-at-top
  found = []
  for name in os.listdir(root):
    m = re.match(r"^stage_(\d+)_(.+)$", name)
    if m and os.path.isdir(os.path.join(root, name)):
      found.append((int(m.group(1)), name))
  return [name for _, name in sorted(found)]


def _not_a_stage(path: str | os.PathLike, option: str) -> tuple[type, str] | None:
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    return FileNotFoundError, f"{option}={path!r} does not exist, so it is not the workdir of a trained stage"
  if not os.path.isdir(path):
    return ConfigError, f"{option}={path!r} is a file: expected the workdir of a trained stage"
  if os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, "checkpoints")):
    return None
  stages = _stage_folders(path)
  if stages:
    return ConfigError, (f"{option}={path!r} is a continual run's workdir, not a stage's: point it at one of its "
                         f"stages, e.g. {os.path.join(path, stages[-1])} (stages: {', '.join(stages)})")
  runs = os.path.join(path, "runs")
  if os.path.isdir(runs):
    seeds = sorted(os.listdir(runs))
    methods = sorted(os.listdir(os.path.join(runs, seeds[0]))) if seeds else []
    example = os.path.join(runs, seeds[0], methods[0]) if methods else runs
    return ConfigError, (f"{option}={path!r} is a retention benchmark's workdir: point it at a stage of one of "
                         f"its runs, runs/seed_<s>/<method>/stage_<k>_<modality> (e.g. under {example})")
  missing = [n for n in (CONFIG_FILE, "checkpoints") if not os.path.exists(os.path.join(path, n))]
  return FileNotFoundError, (f"{option}={path!r} is not the workdir of a trained stage: it lacks "
                             f"{' and '.join(missing)} (it holds {sorted(os.listdir(path))[:8]})")


def not_a_stage(path: str | os.PathLike, option: str = "config.init_from") -> str | None:
  """Why `path` is not the workdir of a trained stage (its config.json and checkpoints/), naming what it is
  instead (a continual run's workdir: its stage folders; a retention benchmark's: its runs); None if it is."""
  found = _not_a_stage(path, option)
  return found and found[1]


def check_stage_workdir(path: str | os.PathLike, option: str = "config.init_from") -> None:
  """Raises, naming `option`, when `path` is not a trained stage's workdir (see `not_a_stage`): ConfigError for
  a folder of another kind (a continual run's, a retention benchmark's) or a file, FileNotFoundError when the
  stage's files are missing."""
  found = _not_a_stage(path, option)
  if found:
    raise found[0](found[1])
