"""The data-free guard: once a stage ends, its training data can no longer be read by this process.

InvCoSS's promise (Sec. 3.2) is that stage T sees only D_T, the previous checkpoint and the stored statistics,
with one documented exception: text cannot be inverted, so a report stage leaves a real k-means buffer of its
texts in its workdir (continual/text.py; the storage log names it). The guard retires the report corpus like
any other stage's data; the buffer, chosen while the corpus was readable, lives outside it. The guard enforces
the promise twice:

1. At the input layer's door: the continual job opens every dataset through `DataFreeGuard.check_config`,
   which raises `DataFreeViolation` for a retired dataset (same registered name and resolved files, any split).
2. At the file system: a process-wide audit hook (PEP 578) raises `DataFreeViolation` from `open()`,
   `os.listdir`, `os.scandir` and friends for any path under a retired stage's files, whoever calls them
   (NumPy, nibabel, PIL, tifffile, grain's reader threads). Worker processes (config.data.num_workers > 0)
   are separate interpreters the hook does not see; the first check covers them, as they are only started
   through the input layer.

Audit hooks cannot be removed, so one hook is installed once and consults the guards that are active
(`with guard.active():`); outside that block it returns at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from typing import Iterator, Sequence

import ml_collections

from invcoss_jax.config_checks import ConfigError
from invcoss_jax.data import registry
from invcoss_jax.privacy import config as privacy_config


class DataFreeViolation(RuntimeError):
  """Data of a finished stage was requested while the data-free guard is active.

  Not an OSError on purpose: readers that turn I/O errors into "bad file" errors (or skip bad files under
  data.lenient) must not swallow it."""


# Audit events whose first argument is a path that is read or listed.
_PATH_EVENTS = frozenset({"open", "os.listdir", "os.scandir", "os.walk", "glob.glob", "shutil.copyfile",
                          "shutil.copytree", "os.chdir"})

_ACTIVE: list["DataFreeGuard"] = []
_HOOK_LOCK = threading.Lock()
_HOOK_INSTALLED = False
_IN_HOOK = threading.local()


def _normalise(path: str) -> tuple[str, ...]:
  """The absolute and the symlink-resolved form of `path` (both are compared)."""
  a = os.path.normpath(os.path.abspath(path))
  r = os.path.normpath(os.path.realpath(path))
  return (a,) if a == r else (a, r)


def _under(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _audit_hook(event: str, args: tuple) -> None:
  if not _ACTIVE or event not in _PATH_EVENTS or not args:
    return
  target = args[0]
  if isinstance(target, bytes):
    target = os.fsdecode(target)
  if not isinstance(target, (str, os.PathLike)):
    return  # file descriptors, None (os.listdir() of the cwd)
  if getattr(_IN_HOOK, "busy", False):
    return
  _IN_HOOK.busy = True
  try:
    for guard in list(_ACTIVE):
      guard.check_path(os.fspath(target), event=event)
  finally:
    _IN_HOOK.busy = False


def _install_hook() -> None:
  global _HOOK_INSTALLED
  with _HOOK_LOCK:
    if not _HOOK_INSTALLED:
      sys.addaudithook(_audit_hook)
      _HOOK_INSTALLED = True


@dataclasses.dataclass(frozen=True)
class RetiredData:
  stage: str  # e.g. 'stage_1_xray'
  name: str  # registered dataset name
  roots: tuple[str, ...]  # normalised file/folder paths of the dataset (images and labels)


def data_identity(data_cfg: ml_collections.ConfigDict) -> tuple[str, tuple[str, ...]]:
  """(registered name, normalised resolved paths) of a data section: what 'the same dataset' means."""
  cfg = registry.resolve(data_cfg)
  roots: list[str] = []
  for p in (cfg.path, cfg.label_path):
    if p:
      roots.extend(_normalise(str(p)))
  return str(cfg.name), tuple(sorted(set(roots)))


class DataFreeGuard:
  """Tracks the datasets of finished stages and refuses every later read of them."""

  def __init__(self, enabled: bool = True):
    self.enabled = bool(enabled)
    self._retired: list[RetiredData] = []
    self._lock = threading.Lock()

  @property
  def retired(self) -> list[RetiredData]:
    with self._lock:
      return list(self._retired)

  def retire(self, stage: str, data_cfg: ml_collections.ConfigDict) -> RetiredData:
    """Marks the dataset of `data_cfg` (all its splits and files) as finished by `stage`."""
    name, roots = data_identity(data_cfg)
    entry = RetiredData(stage=stage, name=name, roots=roots)
    with self._lock:
      self._retired.append(entry)
    return entry

  def _match_roots(self, path: str) -> RetiredData | None:
    forms = _normalise(path)
    for entry in self._retired:
      for root in entry.roots:
        if any(_under(f, root) for f in forms):
          return entry
    return None

  def check_path(self, path: str, *, event: str = "open") -> None:
    """Raises DataFreeViolation if `path` lies under the files of a finished stage."""
    if not self.enabled:
      return
    with self._lock:
      hit = self._match_roots(path)
    if hit is not None:
      raise DataFreeViolation(
          f"data-free guard: {event}({path!r}) touches the training data of {hit.stage} (dataset "
          f"{hit.name!r} under {list(hit.roots)}), which ended; a later stage may read only its own data, the "
          "previous checkpoint, the stored statistics and its buffer (config.continual.data_free_guard)")

  def check_config(self, data_cfg: ml_collections.ConfigDict, *, what: str) -> None:
    """Raises DataFreeViolation if `data_cfg` names (or reads the files of) a finished stage's dataset."""
    if not self.enabled:
      return
    name, roots = data_identity(data_cfg)
    with self._lock:
      for entry in self._retired:
        same_files = any(_under(r, root) or _under(root, r) for r in roots for root in entry.roots)
        if same_files:
          raise DataFreeViolation(
              f"data-free guard: {what} asks for dataset {name!r} ({list(roots)}), the training data of "
              f"{entry.stage}, which ended; a later stage may read only its own data, the previous checkpoint, "
              "the stored statistics and its buffer (config.continual.data_free_guard)")

  @contextlib.contextmanager
  def active(self) -> Iterator["DataFreeGuard"]:
    """Enforces the guard at the file system while the block runs."""
    if not self.enabled:
      yield self
      return
    _install_hook()
    _ACTIVE.append(self)
    try:
      yield self
    finally:
      _ACTIVE.remove(self)


def check_disjoint(stages: Sequence[tuple[str, ml_collections.ConfigDict]]) -> None:
  """Raises ValueError when two stages read the same files (retiring one would lock the other out)."""
  seen: list[tuple[str, tuple[str, ...]]] = []
  for stage, cfg in stages:
    _, roots = data_identity(cfg)
    for other, other_roots in seen:
      if any(_under(r, o) or _under(o, r) for r in roots for o in other_roots):
        raise ValueError(f"config.continual.datasets: {stage} and {other} read the same files ({list(roots)}); "
                         "every stage of a continual sequence needs its own data")
    seen.append((stage, roots))


def real_data_kept(method, order: Sequence[str], datasets: ml_collections.ConfigDict) -> list[str]:
  """What of the real training data a continual `method` keeps past its stage, in words: a replay buffer of
  real samples, a report stage's real text buffer (text is never inverted). Empty: the method is data-free."""
  kept = []
  if method.replays == "real":
    kept.append(f"method {method.name!r} replays a real buffer of every earlier stage ({method.keeps})")
  text = [m for m in order if m in datasets and registry.is_text(datasets[m])]
  if method.text_buffer and text:
    kept.append(f"the report stage {text[0]!r} keeps a real {method.text_buffer} text buffer")
  return kept


def check_privacy(config: ml_collections.ConfigDict, method) -> None:
  """A continual run with config.privacy on: a method keeping real data is refused (ConfigError) unless
  privacy.allow_real_buffers, and DP-SGD of continual stages is not implemented yet (refused either way)."""
  privacy = config.get("privacy")
  if not privacy_config.enabled(privacy):
    return
  c = config.continual
  kept = real_data_kept(method, tuple(str(m) for m in c.order), c.datasets)
  if kept and not bool(privacy.allow_real_buffers):
    raise ConfigError(f"config.privacy is on, but {'; '.join(kept)}: real samples kept past their stage are not "
                      "differentially private; choose a data-free method and order (e.g. invcoss without a report "
                      "stage) or set config.privacy.allow_real_buffers=True to run without a guarantee for them")
  raise ConfigError("config.privacy is on for a continual run: DP-SGD of continual stages is not implemented yet "
                    "(pre-training and fine-tuning have it: docs/privacy.md); set config.privacy.target_epsilon=inf "
                    "and config.privacy.noise_multiplier=0")
