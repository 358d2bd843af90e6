"""Finding the files of a dataset on disk: file discovery, image/label pairing and splits."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from invcoss_jax.data.errors import DataError, SkipLog

SPLITS = ("train", "val", "test")


def require_path(path: str, what: str) -> str:
  if not path:
    raise DataError(None, f"data.path is empty: expected the {what}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.path={path!r} does not exist: expected the {what}")
  return path


def find_files(root: str, suffixes: Sequence[str], *, exclude: Sequence[str] = ()) -> list[str]:
  """Files under `root` (recursively, sorted, hidden entries skipped) whose name ends with a suffix."""
  suffixes = tuple(s.lower() for s in suffixes)
  exclude = {os.path.realpath(e) for e in exclude if e}
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                         and os.path.realpath(os.path.join(dirpath, d)) not in exclude)
    for f in sorted(filenames):
      if not f.startswith(".") and f.lower().endswith(suffixes):
        out.append(os.path.join(dirpath, f))
  return sorted(out)


def split_root(path: str, split: str) -> tuple[str, bool]:
  """(`path/split`, True) when the data has a folder per split, else (`path`, False)."""
  if split and split != "all" and os.path.isdir(os.path.join(path, split)):
    return os.path.join(path, split), True
  return path, False


def split_indices(num: int, split: str, fractions: Sequence[float], seed: int, *,
                  what: str) -> np.ndarray:
  """Indices (sorted) of `split` among `num` cases that have no split of their own.

  With `fractions` (train, val[, test]) the cases are permuted with `seed` and cut at the rounded
  cumulative fractions: deterministic, disjoint and covering. Without fractions only 'train' and
  'all' exist (all cases): asking for 'val' or 'test' would silently evaluate on training data.
  """
  if split in ("all", ""):
    return np.arange(num)
  if not fractions:
    if split == "train":
      return np.arange(num)
    raise DataError(None, f"{what} has no split {split!r} (no folder or keys for it) and "
                    "data.split_fractions is empty: set e.g. --config.data.split_fractions='(0.7,0.1,0.2)'")
  names = SPLITS[:len(fractions)]
  if len(fractions) not in (2, 3) or min(fractions) < 0 or sum(fractions) <= 0:
    raise DataError(None, f"data.split_fractions={tuple(fractions)}: expected 2 or 3 non-negative "
                    "fractions (train, val[, test])")
  if split not in names:
    raise DataError(None, f"data.split={split!r}: expected one of {names + ('all',)} with "
                    f"data.split_fractions={tuple(fractions)}")
  bounds = split_bounds(num, fractions)
  k = names.index(split)
  perm = np.random.default_rng(seed).permutation(num)
  return np.sort(perm[bounds[k]:bounds[k + 1]])


def split_bounds(num: int, fractions: Sequence[float]) -> list[int]:
  """Cut points [0, ..., num] of consecutive parts with the given fractions (rounded)."""
  c = np.cumsum(np.asarray(fractions, float)) / float(sum(fractions))
  return [0] + [int(round(x * num)) for x in c[:-1]] + [num]


def depth_slab(depth: int, split: str, fractions: Sequence[float]) -> tuple[int, int]:
  """[z0, z1) of `split` when every volume is cut along depth into contiguous parts (split_by=depth)."""
  if split in ("all", ""):
    return 0, depth
  if len(fractions) not in (2, 3):
    raise DataError(None, f"data.split_by='depth' needs data.split_fractions (train, val[, test]), got "
                    f"{tuple(fractions)}")
  names = SPLITS[:len(fractions)]
  if split not in names:
    raise DataError(None, f"data.split={split!r}: expected one of {names + ('all',)}")
  b = split_bounds(depth, fractions)
  k = names.index(split)
  return b[k], b[k + 1]


@dataclasses.dataclass(frozen=True)
class Case:
  """One example file (or DICOM series folder) with its optional label map and class label."""
  path: str
  label_path: str | None = None
  label: int | None = None
  case_id: str = ""


def case_id(path: str, root: str, suffixes: Sequence[str], strip: str = "") -> str:
  rel = os.path.relpath(path, root)
  low = rel.lower()
  for s in sorted(suffixes, key=len, reverse=True):
    if low.endswith(s.lower()):
      rel = rel[:-len(s)]
      break
  if strip and rel.endswith(strip):
    rel = rel[:-len(strip)]
  return rel


def pair_with_labels(image_files: Sequence[str], image_root: str, label_root: str,
                     suffixes: Sequence[str], *, image_suffix: str, label_suffix: str,
                     skips: SkipLog | None) -> list[Case]:
  """Cases with the label map of the same case id (relative path without suffix and the optional
  image/label suffixes). An image without a label or a label without an image is an error naming the
  file, or, with `skips` (lenient), a logged skip."""
  if not os.path.isdir(label_root):
    raise FileNotFoundError(f"data.label_path={label_root!r} is not a folder: expected the label maps "
                            "paired with the images by file name")
  labels = {case_id(f, label_root, suffixes, label_suffix): f for f in find_files(label_root, suffixes)}
  cases, used = [], set()
  for f in image_files:
    cid = case_id(f, image_root, suffixes, image_suffix)
    lab = labels.get(cid)
    if lab is None:
      msg = (f"image has no label map: expected {os.path.join(label_root, cid + label_suffix)}"
             f"{suffixes[0]} (or another of {tuple(suffixes)}) in data.label_path")
      if skips is None:
        raise DataError(f, msg)
      skips.skip(f, msg)
      continue
    used.add(cid)
    cases.append(Case(f, lab, None, cid))
  for cid, lab in sorted(labels.items()):
    if cid not in used:
      msg = (f"label map has no image: expected {os.path.join(image_root, cid + image_suffix)}"
             f"{suffixes[0]} in data.path")
      if skips is None:
        raise DataError(lab, msg)
      skips.skip(lab, msg)
  return cases
