"""The stages of a continual sequence: their order, workdirs, configs and what each one left behind.

Stage k (1-based) of modality m lives in `workdir/stage_<k>_<m>/`, a normal stage workdir (config.json,
checkpoints/, statistics.npz, synthetic/ or buffer/, TensorBoard events) plus `stage_info.json`, written last:
its presence with `done: true` marks the stage finished. `joint` has one stage, `stage_1_joint`, over every
modality of `config.continual.order`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from invcoss_jax.config_checks import ConfigError
from invcoss_jax.continual import methods
from invcoss_jax.data.errors import DataError
from invcoss_jax.io_utils import atomic_write_json

STAGE_INFO = "stage_info.json"
BUFFER_DIR = "buffer"  # er / medcoss: the real samples kept of the stage (npz shards, key `images`)
BUFFER_INFO = "buffer.json"
REPLAY_DIR = "replay"  # invcoss with invert_with='latest': stage T's re-synthesised sets of earlier stages
EWC_FILE = "ewc.npz"
PACKNET_FILE = "packnet.npz"
STORAGE_FILE = "storage.json"  # in the sequence workdir: bytes each stage retains, per kind
SEQUENCE_FILE = "continual.json"
JOINT = "joint"  # the modality of the one stage of a method that is not sequential (stage_1_joint)


@dataclasses.dataclass(frozen=True)
class Stage:
  index: int  # 1-based position in the sequence
  modality: str  # the stage's modality, or 'joint'
  workdir: str
  modalities: tuple[str, ...]  # the modalities of its current data (several for 'joint')
  data: tuple[ml_collections.ConfigDict, ...]  # one data section per modality

  @property
  def name(self) -> str:
    return f"stage_{self.index}_{self.modality}"


def stage_key(config: ml_collections.ConfigDict, *folds: int):
  """PRNGKey(config.seed) folded with `folds` (stage index, purpose): every random use of a stage."""
  import jax
  k = jax.random.PRNGKey(int(config.seed))
  for f in folds:
    k = jax.random.fold_in(k, int(f))
  return k


def check_method(config: ml_collections.ConfigDict) -> str:
  """config.continual.method names a registered method (continual/methods/) whose own options are valid;
  returns its name."""
  method = str(config.continual.method)
  methods.get(method).check(config)
  return method


def check_sequence(config: ml_collections.ConfigDict) -> str:
  """The sequence's options (order, datasets, stage steps, method), checked before anything is written;
  returns the method."""
  c = config.continual
  order = tuple(str(m) for m in c.order)
  if not order:
    raise ConfigError("config.continual.order is empty: expected modalities such as ('xray', 'ct', 'mri', 'path')")
  if len(set(order)) != len(order):
    raise ConfigError(f"config.continual.order={order} repeats a modality: each stage needs its own data")
  missing = [m for m in order if m not in c.datasets]
  if missing:
    raise ConfigError(f"config.continual.order names {missing}, which config.continual.datasets lacks "
                      f"(it has {sorted(c.datasets)})")
  stage_steps(config)
  return check_method(config)


def plan_stages(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[Stage]:
  """The stages of `config.continual.order` (one 'joint' stage over all of them for a method that is not
  sequential: joint)."""
  c = config.continual
  order = tuple(str(m) for m in c.order)
  method = methods.get(check_sequence(config))  # checked before any stage starts
  workdir = os.path.abspath(os.fspath(workdir))
  data = tuple(_data_section(c.datasets[m], m) for m in order)
  if not method.sequential:
    return [Stage(1, JOINT, os.path.join(workdir, f"stage_1_{JOINT}"), order, data)]
  return [Stage(k, m, os.path.join(workdir, f"stage_{k}_{m}"), (m,), (d,))
          for k, (m, d) in enumerate(zip(order, data), start=1)]


def _data_section(d: ml_collections.ConfigDict, modality: str) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict(d.to_dict())
  if not d.get("modality"):
    d.modality = modality
  return d


def stage_config(config: ml_collections.ConfigDict, stage: Stage) -> ml_collections.ConfigDict:
  """The job config as this stage's config.json: its data section (the first modality's for 'joint') and the
  stage's steps (`stage_steps`); for 'joint' as many steps as the whole sequence (when every stage has a step
  count)."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.mode = "continual"
  cfg.data = ml_collections.ConfigDict(stage.data[0].to_dict())
  steps = stage_steps(config)
  if stage.modality == JOINT:
    if all(s > 0 for s in steps):
      cfg.total_steps = sum(steps)
  else:
    cfg.total_steps = steps[stage.index - 1]
  return cfg


def stage_steps(config: ml_collections.ConfigDict) -> list[int]:
  """Training steps of each stage of config.continual.order: config.continual.stage_steps where > 0,
  config.total_steps otherwise (<= 0 there: epochs decide)."""
  order = tuple(config.continual.order)
  given = tuple(int(s) for s in (config.continual.get("stage_steps") or ()))
  if given and len(given) != len(order):
    raise ConfigError(f"config.continual.stage_steps={given}: expected one entry per stage of "
                     f"config.continual.order={order} (or () for config.total_steps={int(config.total_steps)} each)")
  given = given or (0,) * len(order)
  return [s if s > 0 else int(config.total_steps) for s in given]


# What a stage's training depends on (its config.json against this run's), and loading and dispatch knobs
# that it does not (steps_per_dispatch runs the same steps, so a stage may resume under another value).
_TRAINING_PREFIXES = ("total_steps", "seed", "train.", "model.", "data.")
_LOADING_KEYS = {"read_threads", "num_workers", "prefetch_buffer_size", "worker_buffer_size", "volume_cache_size",
                 "window_cache_size", "lenient", "steps_per_dispatch"}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def training_changes(old: dict, new: dict, prefixes: tuple[str, ...] = _TRAINING_PREFIXES) -> list[str]:
  """'key: old -> new' for every option a stage's training depends on (`prefixes`) that differs between its
  recorded config.json (`old`) and this run's stage config (`new`, both plain JSON dicts)."""
  a, b = _flatten(old), _flatten(new)
  out = []
  for k in sorted(set(a) | set(b)):
    if not k.startswith(prefixes) or k.rsplit(".", 1)[-1] in _LOADING_KEYS:
      continue
    if k in a and k in b and a[k] != b[k]:
      out.append(f"{k}: {a[k]!r} -> {b[k]!r}")
  return out


def read_info(stage: Stage) -> dict[str, Any] | None:
  path = os.path.join(stage.workdir, STAGE_INFO)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(path, f"not valid JSON ({e}); it is written atomically, so it was edited by hand") from e


def finished_info(stage: Stage) -> dict[str, Any]:
  """stage_info.json of a finished stage; FileNotFoundError when the stage has not finished."""
  info = read_info(stage)
  if not info or not info.get("done"):
    raise FileNotFoundError(f"{stage.workdir}: the stage has not finished (no stage_info.json with done=true)")
  return info


def read_record(path: str) -> dict:
  """A JSON record a stage writes (buffer.json, inversion.json, ...); FileNotFoundError when absent."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: the stage that writes it did not finish")
  with open(path) as f:
    return json.load(f)


def write_info(stage: Stage, info: dict[str, Any]) -> None:
  atomic_write_json(os.path.join(stage.workdir, STAGE_INFO), info)


def folder_bytes(path: str) -> int:
  """Bytes of a file, or of every file under a folder (0 if absent)."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total
