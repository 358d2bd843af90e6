"""Small file-system helpers shared by every job: atomic writes so nothing already written is lost."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import numpy as np

from invcoss_jax import faults


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path in the same folder; renames it to `path` only if the block succeeds."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  suffix = os.path.splitext(path)[1]
  prefix = ".tmp-" + os.path.basename(path) + "-"
  remove_stale(folder, prefix)
  fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
  os.close(fd)
  try:
    yield tmp
    faults.point("atomic:" + os.path.basename(path))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def remove_stale(folder: str, prefix: str) -> None:
  """Deletes what a killed writer left in `folder` under `prefix` (temporary files or folders of an atomic
  write of the same target: never read, but they would pile up over restarts)."""
  try:
    names = os.listdir(folder)
  except FileNotFoundError:
    return
  for name in names:
    if name.startswith(prefix):
      p = os.path.join(folder, name)
      if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.remove(p)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes text or bytes to `path` atomically (write to a temporary file, then rename)."""
  mode = "wb" if isinstance(data, bytes) else "w"
  with atomic_path(path) as tmp:
    with open(tmp, mode) as f:
      f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """np.savez to `path` atomically (the name is kept exactly; NumPy would append .npz otherwise)."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)


def _json_default(o: Any) -> Any:
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike, error: Callable[[str], Exception]) -> Any:
  """The JSON in `path` (a file this package writes atomically); a file that does not parse was edited by
  hand, raised as `error(message)` naming it."""
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise error(f"{os.fspath(path)} is not valid JSON ({e}); it is written atomically, so it was edited by "
                  "hand: fix or delete it") from e
