"""Finding the files of a dataset on disk: file discovery, image/label pairing and splits."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from invcoss_jax.data.errors import DataError, MissingDataError, SkipLog

SPLITS = ("train", "val", "test")


def require_path(path: str, what: str) -> str:
  if not path:
    raise DataError(None, f"data.path is empty: expected the {what}")
  if not os.path.exists(path):
    raise MissingDataError(None, f"data.path={path!r} does not exist: expected the {what}")
  return path


def find_files(root: str, suffixes: Sequence[str], *, exclude: Sequence[str] = ()) -> list[str]:
  """Files under `root` (recursively, sorted, hidden entries skipped) whose name ends with a suffix.

  Symbolic links are followed, but each directory and each file is visited once (by its real path): a
  link back to an ancestor (a loop) or a second link to the same folder or file adds nothing."""
  suffixes = tuple(s.lower() for s in suffixes)
  exclude = {os.path.realpath(e) for e in exclude if e}
  seen_dirs = {os.path.realpath(root)}
  seen_files: set[str] = set()
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    keep = []
    for d in sorted(dirnames):
      real = os.path.realpath(os.path.join(dirpath, d))
      if d.startswith(".") or real in exclude or real in seen_dirs:
        continue
      seen_dirs.add(real)
      keep.append(d)
    dirnames[:] = keep
    for f in sorted(filenames):
      if not f.startswith(".") and f.lower().endswith(suffixes):
        path = os.path.join(dirpath, f)
        real = os.path.realpath(path)
        if real not in seen_files:
          seen_files.add(real)
          out.append(path)
  return sorted(out)


def split_root(path: str, split: str, fractions: Sequence[float] = ()) -> tuple[str, bool]:
  """(folder to read, whether it is exactly the split) for data that may have a folder per split.

  `path/split` is the split when it exists. Data with `train/` (and `test/`) but no `val/` folder,
  read with `split_fractions` (e.g. (0.8, 0.2)), carve 'train' and 'val' out of `train/` (the ChestXR,
  QaTa, NCH and GlaS protocols); the second value is then False and the fractions apply.
  """
  if not split or split == "all":
    return path, False
  has = lambda s: os.path.isdir(os.path.join(path, s))
  carve = bool(fractions) and split in ("train", "val") and has("train") and not has("val")
  if carve:
    return os.path.join(path, "train"), False
  if has(split):
    return os.path.join(path, split), True
  return path, False


def split_indices(num: int, split: str, fractions: Sequence[float], seed: int, *, what: str,
                  strata: Sequence[int] | None = None) -> np.ndarray:
  """Indices (sorted) of `split` among `num` cases that have no split of their own.

  With `fractions` (train, val[, test]) the cases are permuted with `seed` and cut at the rounded
  cumulative fractions: deterministic, disjoint and covering. With `strata` (class labels) this is
  done within each class, so every split keeps the class proportions. Without fractions only
  'train' and 'all' exist (all cases): asking for 'val' or 'test' would silently evaluate on
  training data.
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
  k = names.index(split)
  groups = [np.arange(num)] if strata is None else [
      np.flatnonzero(np.asarray(strata) == v) for v in np.unique(np.asarray(strata))]
  out = []
  for g, members in enumerate(groups):
    bounds = split_bounds(len(members), fractions)
    perm = np.random.default_rng([seed, g]).permutation(len(members))
    out.append(members[perm[bounds[k]:bounds[k + 1]]])
  return np.sort(np.concatenate(out)) if out else np.arange(0)


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


def case_id(path: str, root: str, suffixes: Sequence[str], strip_suffix: str = "",
            strip_prefix: str = "") -> str:
  """Relative path of a file without its extension and the given file-name prefix/suffix."""
  rel = os.path.relpath(path, root)
  low = rel.lower()
  for s in sorted(suffixes, key=len, reverse=True):
    if low.endswith(s.lower()):
      rel = rel[:-len(s)]
      break
  folder, name = os.path.split(rel)
  if strip_suffix and name.endswith(strip_suffix):
    name = name[:-len(strip_suffix)]
  if strip_prefix and name.startswith(strip_prefix):
    name = name[len(strip_prefix):]
  return os.path.join(folder, name)


@dataclasses.dataclass(frozen=True)
class Naming:
  """File names of a case: image `{image_prefix}{id}{image_suffix}.ext`, label map
  `{label_prefix}{id}{label_suffix}.ext` (e.g. LiTS 'volume-3'/'segmentation-3', nnU-Net
  'case_0000'/'case', QaTa 'x'/'mask_x')."""
  image_prefix: str = ""
  image_suffix: str = ""
  label_prefix: str = ""
  label_suffix: str = ""

  def image_id(self, path: str, root: str, suffixes: Sequence[str]) -> str:
    return case_id(path, root, suffixes, self.image_suffix, self.image_prefix)

  def label_id(self, path: str, root: str, suffixes: Sequence[str]) -> str:
    return case_id(path, root, suffixes, self.label_suffix, self.label_prefix)

  def label_name(self, cid: str) -> str:
    folder, name = os.path.split(cid)
    return os.path.join(folder, self.label_prefix + name + self.label_suffix)

  def image_name(self, cid: str) -> str:
    folder, name = os.path.split(cid)
    return os.path.join(folder, self.image_prefix + name + self.image_suffix)


def pair_with_labels(image_files: Sequence[str], image_root: str, label_root: str,
                     suffixes: Sequence[str], *, naming: Naming, skips: SkipLog | None) -> list[Case]:
  """Cases with the label map of the same case id. An image without a label or a label without an
  image is an error naming the file, or, with `skips` (lenient), a logged skip."""
  if not os.path.isdir(label_root):
    raise MissingDataError(None, f"data.label_path={label_root!r} is not a folder: expected the label maps "
                           "paired with the images by file name")
  labels = {naming.label_id(f, label_root, suffixes): f for f in find_files(label_root, suffixes)}
  cases, used = [], set()
  for f in image_files:
    cid = naming.image_id(f, image_root, suffixes)
    lab = labels.get(cid)
    if lab is None:
      msg = (f"image has no label map: expected {os.path.join(label_root, naming.label_name(cid))}"
             f"{suffixes[0]} (or another of {tuple(suffixes)}) in data.label_path")
      if skips is None:
        raise DataError(f, msg)
      skips.skip(f, msg)
      continue
    used.add(cid)
    cases.append(Case(f, lab, None, cid))
  for cid, lab in sorted(labels.items()):
    if cid not in used:
      msg = (f"label map has no image: expected {os.path.join(image_root, naming.image_name(cid))}"
             f"{suffixes[0]} in data.path")
      if skips is None:
        raise DataError(lab, msg)
      skips.skip(lab, msg)
  return cases


def with_class_labels(cases: Sequence[Case], root: str) -> list[Case]:
  """Class label of every case from the sub-folder of `root` it lies in (sorted folder names)."""
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                   and not d.startswith("."))
  out = []
  for c in cases:
    top = os.path.relpath(c.path, root).split(os.sep)[0]
    if top not in classes or top == os.path.relpath(c.path, root):
      raise DataError(c.path, f"expected every example inside a class sub-folder of {root} "
                      f"(data.class_subfolders=True; classes found: {classes})")
    out.append(Case(c.path, c.label_path, classes.index(top), c.case_id))
  return out
