#!/usr/bin/env python
"""Builds the grey 2D stage of `configs/retention.py:content`: axial slices of the MSD hippocampus MRI crops.

    python scripts/build_mri_slices.py [--shared ../shared/data] [--out workdirs/data/hippocampus_slices_32.npz]

Why this set: replay content can only matter when the later stage moves the features that the earlier stage's
images use. A grey later stage in the X-ray's input range (one intensity channel, replicated to three like the
X-rays) overwrites the same low-level features, where pathology's colour tiles leave them mostly alone.

What it holds (MedMNIST layout, read by `format='npz'`): `{train,val,test}_images` (N, 32, 32) uint8 and
`{train,val,test}_labels` (N, 1). Every axial slice (last axis) of every case that has an image and a label,
no intensity outlier (max < 1e5), and at least 20 hippocampus voxels in the slice; each volume scaled by its
own 1st..99th percentile to 0..255 and the slice resized to 32x32 (bilinear). The label is the slice's
anatomy: 1 where the anterior hippocampus (label 1) has more voxels than the posterior (label 2), else 0.
Cases are split 60/20/20 by their sorted ids (every 5th case to test, the one after it to val), so no patient
is in two splits. Output is deterministic. Source: Medical Segmentation Decathlon Task04 (Antonelli et al.,
Nat Commun 2022), CC BY-SA 4.0; keep this attribution with any copy.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "workdirs", "data", "hippocampus_slices_32.npz")
SIZE = 32
MIN_VOXELS = 20
OUTLIER_MAX = 1e5


def _resize(x: np.ndarray, size: int) -> np.ndarray:
  from PIL import Image
  return np.asarray(Image.fromarray(x.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))


def build(shared: str, out: str) -> dict[str, int]:
  import nibabel as nib
  folder = os.path.join(shared, "mri", "hippocampus")
  images = sorted(glob.glob(os.path.join(folder, "images", "*.nii.gz")))
  if not images:
    raise FileNotFoundError(f"{folder}/images holds no .nii.gz volumes: pass --shared=<the shared data folder>")
  parts: dict[str, tuple[list, list]] = {s: ([], []) for s in ("train", "val", "test")}
  for k, path in enumerate(images):
    label_path = os.path.join(folder, "labels", os.path.basename(path))
    if not os.path.isfile(label_path):
      continue
    vol = np.asarray(nib.load(path).get_fdata(), np.float32)
    if float(vol.max()) >= OUTLIER_MAX:
      continue
    seg = np.asarray(nib.load(label_path).get_fdata()).astype(np.int64)
    if seg.shape != vol.shape:
      raise ValueError(f"{label_path}: label shape {seg.shape} differs from its image's {vol.shape}")
    lo, hi = np.percentile(vol, [1, 99])
    vol = np.clip((vol - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    split = "test" if k % 5 == 0 else "val" if k % 5 == 1 else "train"
    for z in range(vol.shape[-1]):
      s = seg[..., z]
      if int((s > 0).sum()) < MIN_VOXELS:
        continue
      parts[split][0].append(np.clip(np.rint(_resize(vol[..., z], SIZE)), 0, 255).astype(np.uint8))
      parts[split][1].append(int((s == 1).sum() > (s == 2).sum()))
  arrays = {}
  for split, (x, y) in parts.items():
    arrays[f"{split}_images"] = np.stack(x)
    arrays[f"{split}_labels"] = np.asarray(y, np.int64)[:, None]
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, out)
  return {k: int(len(v)) for k, v in arrays.items() if k.endswith("_images")}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shared", default=os.environ.get("INVCOSS_SHARED_DATA", os.path.join(REPO, "..", "shared", "data")))
  p.add_argument("--out", default=DEFAULT_OUT)
  a = p.parse_args(argv)
  counts = build(a.shared, a.out)
  print(f"{a.out}: {counts}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
