"""Checks of a job's options before any work starts, each error naming the option and what was expected.

`check_override_keys` runs on the command line before absl parses it (an unknown `--config.key` would
otherwise end in a raw AttributeError); `check_options` runs at the start of `jobs.run`, so a notebook's
config is checked too. File contents are checked later, by the readers, as each file is opened.
"""

from __future__ import annotations

import copy
import difflib
import math
import operator
from typing import Iterable, Sequence

import ml_collections
from absl import logging


class ConfigError(ValueError):
  """An option out of range or inconsistent with another; the entry point prints it without a traceback."""


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf option of a config as a dotted path (ConfigDict sections are descended into)."""
  out = []
  for k in config.keys():
    path = f"{prefix}{k}"
    out.append(path)
    if isinstance(config[k], ml_collections.ConfigDict):
      out.extend(flat_keys(config[k], path + "."))
  return out


def check_override_keys(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
  """Raises ValueError for the first dotted key (as in `--config.<key>=...`) the config lacks, naming the
  nearest existing options."""
  known = flat_keys(config)
  known_set = set(known)
  for key in keys:
    if key in known_set:
      continue
    if key in MOVED_OPTIONS:
      raise _moved(key, "--config.")
    parent = key.rpartition(".")[0]
    while parent and parent not in known_set:
      parent = parent.rpartition(".")[0]
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    siblings = sorted(k for k in known if k.rpartition(".")[0] == parent and k != parent)
    hint = (f"did you mean {', '.join('--config.' + n for n in near)}?" if near else
            f"options {'under ' + parent if parent else 'at the top level'}: {', '.join(siblings[:12])}"
            + (" ..." if len(siblings) > 12 else ""))
    raise ConfigError(f"--config.{key}: no such option in this config; {hint}")


def override_keys(argv: Sequence[str]) -> list[str]:
  """The dotted keys of `--config.<key>=value` / `--config.<key> value` arguments."""
  keys = []
  for a in argv:
    if a.startswith("--config."):
      keys.append(a[len("--config."):].split("=", 1)[0])
  return keys


# Options that moved (one name per value): old dotted name -> (the option that holds the value now, a note).
# `--config.method` stays a command-line alias of `--config.continual.method` (README, docs/continual.md),
# rewritten by `resolve_aliases` before the command line is parsed; any other use of an old name is refused
# (`check_override_keys`, `check_options`), naming the new one. Configs recorded before the move (a stage's
# config.json) are read without them (`without_moved`).
MOVED_OPTIONS = {
    "method": ("continual.method", "on the command line --config.method is an alias of it"),
    "inversion.buffer_fraction": ("continual.buffer_fraction", "the one buffer fraction: the real buffers, the "
                                  "synthetic sets (unless inversion.num_samples > 0) and the audit's buffer"),
    "audit.buffer_fraction": ("continual.buffer_fraction", "the one buffer fraction; audit.draw_buffer=False "
                              "skips the audit's drawn replay buffer"),
}
COMMAND_LINE_ALIASES = ("method",)


def _moved(key: str, where: str) -> ConfigError:
  new, note = MOVED_OPTIONS[key]
  return ConfigError(f"{where}{key} is no longer an option: it moved to {where}{new} ({note})")


def resolve_aliases(argv: Sequence[str]) -> list[str]:
  """`argv` with each command-line alias (`--config.method=...`) written as the option it stands for
  (`--config.continual.method=...`): the one place an alias is resolved."""
  out = []
  for a in argv:
    for alias in COMMAND_LINE_ALIASES:
      flag = f"--config.{alias}"
      if a == flag or a.startswith(flag + "="):
        a = f"--config.{MOVED_OPTIONS[alias][0]}" + a[len(flag):]
    out.append(a)
  return out


def check_moved_options(config: ml_collections.ConfigDict) -> None:
  """ConfigError for an option of `config` that moved (MOVED_OPTIONS), naming where it is now."""
  keys = set(flat_keys(config))
  for old in MOVED_OPTIONS:
    if old in keys:
      raise _moved(old, "config.")


def without_moved(config: dict) -> dict:
  """A copy of a recorded config (plain dict, e.g. a stage's config.json) without the options that moved since."""
  out = copy.deepcopy(config)
  for old in MOVED_OPTIONS:
    *path, leaf = old.split(".")
    section = out
    for part in path:
      section = section.get(part) if isinstance(section, dict) else None
    if isinstance(section, dict):
      section.pop(leaf, None)
  return out


def data_sections(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(option prefix, data section) of every dataset the job trains or evaluates on."""
  mode = str(config.get("mode", "pretrain"))
  if mode in ("continual", "retention") and "continual" in config:
    c = config.continual
    return [(f"continual.datasets.{m}", c.datasets[m]) for m in c.order if m in c.datasets]
  return [("data", config.data)] if "data" in config else []


def _patch_grid(section: str, d: ml_collections.ConfigDict, model: ml_collections.ConfigDict):
  """Patches per example of a resolved data section, after checking that the patches tile it."""
  if int(d.spatial_dims) == 3:
    shape, patch, what, option = tuple(d.volume_shape), tuple(model.patch_size_3d), "volume", "volume_shape"
  else:
    shape = (int(d.image_size),) * 2
    patch, what, option = tuple(model.patch_size_2d), "image", "image_size"
  if len(patch) != len(shape) or any(int(p) <= 0 for p in patch):
    raise ConfigError(f"model.patch_size_{len(shape)}d={patch}: expected {len(shape)} positive sizes")
  bad = [(s, p) for s, p in zip(shape, patch) if s % p]
  if bad:
    raise ConfigError(f"{section}.{option}={d.get(option)}: the {what} of {shape} is not tiled by "
                     f"model.patch_size_{len(shape)}d={patch} ({bad[0][0]} is not a multiple of {bad[0][1]}); "
                     f"expected each size a multiple of the patch")
  return math.prod(s // p for s, p in zip(shape, patch))


def _check_seed(option: str, value) -> int:
  """A seed: a non-negative integer (NumPy's generators, which the input layer seeds with it, refuse a negative
  one with an error that does not name the option)."""
  try:
    seed = operator.index(value)
  except TypeError:
    seed = None
  if seed is None or isinstance(value, bool) or not 0 <= seed < 2**63:
    raise ConfigError(f"{option}={value!r}: expected a non-negative integer seed (below 2**63)")
  return seed


def check_seeds(option: str, seeds, *, required: bool = True, distinct: bool = False) -> list[int]:
  """A tuple of seeds: each non-negative, at least one when `required`, none twice when `distinct`."""
  seeds = tuple(seeds or ())
  if required and not seeds:
    raise ConfigError(f"{option}=(): expected at least one seed, e.g. (0,)")
  out = [_check_seed(f"{option}[{i}]", s) for i, s in enumerate(seeds)]
  if distinct and len(set(out)) != len(out):
    raise ConfigError(f"{option}={seeds}: a seed repeats; expected distinct seeds")
  return out


def check_steps(config: ml_collections.ConfigDict) -> None:
  """`total_steps`: positive, or -1 (the length follows from train.num_epochs); a sequence's
  `continual.stage_steps`: one entry per stage, each positive or 0 (the stage takes total_steps)."""
  total = int(config.get("total_steps", -1))
  if total != -1 and total <= 0:
    raise ConfigError(f"total_steps={total}: expected a positive number of training steps, or -1 to take the "
                      "length from train.num_epochs")
  mode = str(config.get("mode", "pretrain"))
  if mode in ("continual", "retention") and "continual" in config:
    given = tuple(config.continual.get("stage_steps") or ())
    bad = [s for s in given if int(s) < 0]
    if bad:
      raise ConfigError(f"continual.stage_steps={given}: expected positive steps (0: the stage takes "
                        f"total_steps={total})")


def check_batch_fits(option: str, batch: int, num_examples: int, what: str, *, used: int | None = None,
                     volumes: bool = False) -> None:
  """A batch larger than its dataset would repeat every example several times in one step (and a batch far
  larger runs out of memory only after tens of seconds): refused, with the dataset's size. `used`: the
  examples of this dataset in each batch when the batch mixes several (default: all of it). `volumes`: the
  examples are 3D volumes, of which each step samples windows (a batch of windows from fewer volumes is
  usual): said, not refused."""
  used = int(batch) if used is None else int(used)
  if used <= int(num_examples):
    return
  share = "" if used == int(batch) else f" (of which {used} from {what})"
  message = (f"{option}={int(batch)}{share} is larger than the {int(num_examples)} examples of {what}: every "
             "step would repeat examples")
  if volumes:
    logging.warning("%s (windows sampled from the same volumes)", message)
    return
  raise ConfigError(f"{message}; expected at most {int(num_examples)}")


def fraction_count(option: str, fraction: float, num_examples: int) -> int:
  """Examples in `fraction` of `num_examples`: int(fraction x N), at least 1 (MedCoSS's buffer size).

  The one conversion of a buffer fraction into a count, used by the continual buffers, the synthetic set of a
  stage, the storage comparison and the audit's replay buffer, so that all of them agree on the same sample
  count (int and round differ by one where fraction x N ends in .5 or more)."""
  fraction = float(fraction)
  if not 0.0 < fraction <= 1.0:
    raise ConfigError(f"{option} must be in (0, 1], got {fraction}")
  return max(1, int(fraction * int(num_examples)))


def check_options(config: ml_collections.ConfigDict) -> None:
  """Ranges and consistency of the options every training job shares; raises ValueError naming the option."""
  # cycle: data.tokenization raises this module's ConfigError (allow-listed in tests/test_layering.py)
  from invcoss_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  from invcoss_jax.data.registry import resolve  # pylint: disable=g-import-not-at-top

  mode = str(config.get("mode", "pretrain"))
  check_moved_options(config)
  if "seed" in config:
    _check_seed("seed", config.seed)
  check_steps(config)
  if "evaluate" in config and "seeds" in config.evaluate:
    check_seeds("evaluate.seeds", config.evaluate.seeds, required=mode in ("evaluate", "forgetting"))
  if mode == "retention" and "retention" in config:
    check_seeds("retention.seeds", config.retention.seeds, distinct=True)
  train = config.get("train")
  if train is not None:
    r = float(train.get("mask_ratio", 0.75))
    if not 0.0 <= r < 1.0:
      raise ConfigError(f"train.mask_ratio={r}: expected 0 <= ratio < 1 (the fraction of patches hidden "
                       "from the encoder; MAE uses 0.75)")
    b = int(train.get("global_batch_size", 1))
    if b <= 0:
      raise ConfigError(f"train.global_batch_size={b}: expected a positive number of examples per step")
    k = int(train.get("grad_accum_steps", 1))
    if k < 1 or b % k:
      raise ConfigError(f"train.grad_accum_steps={k}: expected a positive divisor of train.global_batch_size={b} "
                        "(each step accumulates that many equal micro-batches)")
    per_dispatch = int(train.get("steps_per_dispatch", 1))
    if per_dispatch < 1:
      raise ConfigError(f"train.steps_per_dispatch={per_dispatch}: expected a positive number of train steps "
                        "per compiled dispatch (1: one step at a time)")
    lr = float(train.get("base_lr", 1.0))
    if not (math.isfinite(lr) and lr > 0):
      raise ConfigError(f"train.base_lr={lr}: expected a positive, finite learning rate")
  model = config.get("model")
  if model is None or "patch_size_2d" not in model:
    return
  for section, d in data_sections(config):
    try:
      d = resolve(d)
    except DataError:
      continue  # the job's own loader reports it, with the file
    if str(d.modality) == "report":  # text: token ids, no patches; the length must fit the position table
      length, rows = int(d.text.max_length), int(model.get("text_max_len", 512))
      if not 3 <= length <= rows:
        raise ConfigError(f"{section}.text.max_length={length}: expected 3 ([CLS], a token, [SEP]) to "
                          f"model.text_max_len={rows} tokens")
      continue
    n = _patch_grid(section, d, model)
    if train is not None and str(config.get("mode", "pretrain")) in ("pretrain", "continual", "retention"):
      keep = int(n * (1 - float(train.mask_ratio)))
      if keep < 1 or keep >= n:
        raise ConfigError(
            f"train.mask_ratio={float(train.mask_ratio)} with {n} patches per example of {section} keeps "
            f"{keep}: expected at least one visible and one hidden patch (MAE learns from the hidden ones)")
