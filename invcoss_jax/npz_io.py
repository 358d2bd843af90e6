"""Reading .npz archives safely from several threads.

NumPy parses every .npy header with `ast.literal_eval`, and CPython 3.11's AST construction is not
thread-safe (python/cpython#106905: "SystemError: AST constructor recursion depth mismatch"), which grain's
read threads hit when each opens an .npz at once. Here the header parse, and only it, holds one
process-wide lock; the members are then decompressed outside the lock, straight into their arrays, so
reads of several files still overlap. Every .npz the package reads goes through `load_npz` or
`npz_headers` (`numpy.load` elsewhere, e.g. in a notebook's main thread, would still race with them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import zipfile
from typing import Iterable

import numpy as np

from invcoss_jax import faults
from invcoss_jax.io_utils import atomic_savez, remove_stale

# Held while NumPy parses a .npy header (see the module docstring); exposed for tests.
HEADER_LOCK = threading.Lock()


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
  version = np.lib.format.read_magic(f)
  with HEADER_LOCK:
    if version == (1, 0):
      return np.lib.format.read_array_header_1_0(f)
    if version in ((2, 0), (3, 0)):
      return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f"unsupported .npy format version {version}")


def _members(zf: zipfile.ZipFile) -> dict[str, str]:
  return {name[:-4]: name for name in zf.namelist() if name.endswith(".npy")}


def npz_headers(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (shape, dtype)} of every array of an .npz, from the .npy headers only (nothing decompressed
  beyond them)."""
  out = {}
  with zipfile.ZipFile(os.fspath(path)) as zf:
    for key, name in _members(zf).items():
      with zf.open(name) as f:
        shape, _, dtype = _read_header(f)
      out[key] = (tuple(shape), dtype)
  return out


def _read_array(f, path: str, key: str) -> np.ndarray:
  shape, fortran, dtype = _read_header(f)
  if dtype.hasobject:
    raise ValueError(f"{path}: array {key!r} holds Python objects (dtype {dtype}); only numeric arrays are "
                     "read (pickles are never loaded)")
  count = int(np.prod(shape, dtype=np.int64))
  flat = np.empty(count, dtype)
  view = memoryview(flat.view(np.uint8))
  done = 0
  while done < flat.nbytes:
    n = f.readinto(view[done:])
    if not n:
      raise EOFError(f"{path}: array {key!r} ends after {done} of {flat.nbytes} bytes")
    done += n
  return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def load_npz(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """The arrays `keys` (default: all) of an .npz as writable NumPy arrays, like `dict(np.load(path))`
  without pickles, safe to call from many threads. A missing key raises KeyError naming the file and the
  keys it has; a truncated or corrupt file raises EOFError / ValueError / zipfile.BadZipFile."""
  path = os.fspath(path)
  with zipfile.ZipFile(path) as zf:
    members = _members(zf)
    wanted = list(members) if keys is None else list(keys)
    missing = [k for k in wanted if k not in members]
    if missing:
      raise KeyError(f"{path}: no array named {missing[0]!r} (it has {sorted(members)})")
    out = {}
    for key in wanted:
      with zf.open(members[key]) as f:
        out[key] = _read_array(f, path, key)
  return out


def write_shards(folder: str, images: np.ndarray, shard_size: int) -> list[str]:
  """Replaces `folder` by npz shards `shard_00000.npz`, ... (key `images`, float32), all written before the
  swap: a synthetic set or a real replay buffer appears whole or not at all."""
  if shard_size < 1:
    raise ValueError(f"config.inversion.shard_size must be >= 1, got {shard_size}")
  parent = os.path.dirname(os.path.abspath(folder))
  os.makedirs(parent, exist_ok=True)
  for stale in (".tmp-", ".old-"):  # left by a writer killed before its swap or clean-up
    remove_stale(parent, stale + os.path.basename(folder) + "-")
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(folder) + "-", dir=parent)
  try:
    names = []
    for i, start in enumerate(range(0, len(images), shard_size)):
      name = f"shard_{i:05d}.npz"
      atomic_savez(os.path.join(tmp, name), images=np.asarray(images[start:start + shard_size], np.float32))
      names.append(name)
    faults.point("atomic:" + os.path.basename(folder))
    old = None
    if os.path.exists(folder):
      old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(folder) + "-", dir=parent)
      os.replace(folder, os.path.join(old, "x"))
    os.replace(tmp, folder)
    if old:
      shutil.rmtree(old)
    return names
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
