#!/usr/bin/env python
"""Rebuilds the embedded demo corpus (invcoss_jax/data/demo/) from ../shared/data, byte for byte.

    python scripts/build_demo_corpus.py --shared /work/shared/data [--out invcoss_jax/data/demo]

What goes in (all four modalities, ~12 MB, only openly licensed files; see ATTRIBUTION.md there):
  xray/pneumoniamnist_subset.npz   PneumoniaMNIST: 1500/250/250 train/val/test images+labels, stratified by class
  ct/images/totalseg_ct.nii.gz     TotalSegmentator CT, larger field of view (copied as is)
  ct_organs/{images,labels}/totalseg_ct_small.nii.gz   the CT crop and its organ map (copied)
  mri/{images,labels}/hippocampus_*.nii.gz  40 MSD hippocampus cases: every 5th (by id) of the cases
                                   that have both image and label and no intensity outlier (max < 1e5)
  pathology/tiles/*.png            H&E tiles (64x64): every 5th tile of each of the two slides
  pathology/wsi/cmu-1-small-region.svs  one small whole-slide image (CC0), for the `wsi` reader
Left out: ct/stent.npz and the DICOM slices (licence not stated), the defective hippocampus cases
(tests read those from ../shared/data).

Output is deterministic: files are copied, .npz members get a fixed timestamp, PNGs carry no
metadata; MANIFEST.json lists every file with its size and SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "invcoss_jax", "data", "demo")

XRAY_COUNTS = {"train": 1500, "val": 250, "test": 250}
MRI_CASES = 40
MRI_OUTLIER_MAX = 1e5  # a few MSD volumes reach 1.7e6 where most stay below 1e4
TILE_STEP = 5
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)

ATTRIBUTION = """\
# Attribution and licences of the embedded demo corpus

Built by scripts/build_demo_corpus.py from ../shared/data (see its README.md); every file below is a
copy or a subset of an openly licensed public dataset. Keep these lines with any copy.

| files | what | source | licence |
|---|---|---|---|
| xray/pneumoniamnist_subset.npz | PneumoniaMNIST chest X-rays 28x28, labels 0 normal / 1 pneumonia; 1500/250/250 of train/val/test, stratified by class (first of each class in file order) | MedMNIST v2 (Yang et al., Scientific Data 2023), from Kermany et al., Cell 2018 | CC BY 4.0 |
| ct/images/totalseg_ct.nii.gz, ct_organs/images/totalseg_ct_small.nii.gz, ct_organs/labels/totalseg_ct_small.nii.gz | abdominal CT (Hounsfield units, 3 mm) and its TotalSegmentator organ map (the label file is `totalseg_ct_small_seg.nii.gz` renamed) | TotalSegmentator test reference files (Wasserthal et al., Radiology: AI 2023) | Apache-2.0 |
| mri/images/*.nii.gz, mri/labels/*.nii.gz | 40 brain MRI crops around the hippocampus with labels 0 background, 1 anterior, 2 posterior | Medical Segmentation Decathlon Task04_Hippocampus (Antonelli et al., Nature Communications 2022; Simpson et al. 2019) | CC BY-SA 4.0 (this subset is shared under the same licence) |
| pathology/wsi/cmu-1-small-region.svs | H&E whole-slide image (Aperio SVS) | OpenSlide test data, CMU-1 | CC0 1.0 |
| pathology/tiles/cmu-1-small-region_*.png | 64x64 H&E tissue tiles (128x128 level-0 tiles with >= 60 % tissue, resized) | derived from CMU-1 (OpenSlide test data) | CC0 1.0 |
| pathology/tiles/tcga-cr-7395-01a-01-ts1_*.png | 64x64 H&E tissue tiles, as above | derived from TCGA slide TCGA-CR-7395-01A-01-TS1, The Cancer Genome Atlas open-access data (NIH Genomic Data Commons) | NIH GDC open access |
"""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """np.savez_compressed with fixed member timestamps (NumPy stamps the current time)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for key in sorted(arrays):
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
      info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_TIME)
      info.compress_type = zipfile.ZIP_DEFLATED
      info.external_attr = 0o644 << 16
      zf.writestr(info, buf.getvalue())
  os.replace(tmp, path)


def _copy(src: str, dst: str) -> None:
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  shutil.copyfile(src, dst)


def stratified_first(labels: np.ndarray, n: int) -> np.ndarray:
  """Indices of `n` examples keeping the split's class proportions: the first ones of each class in file
  order (the shared file is not in the official order, so a plain prefix is heavily skewed)."""
  labels = labels.reshape(-1)
  classes, counts = np.unique(labels, return_counts=True)
  quotas = np.floor(counts / counts.sum() * n).astype(int)
  for i in np.argsort(-counts)[: n - quotas.sum()]:
    quotas[i] += 1
  return np.sort(np.concatenate([np.flatnonzero(labels == c)[:q] for c, q in zip(classes, quotas)]))


def _xray(shared: str, out: str) -> None:
  with np.load(os.path.join(shared, "xray", "pneumoniamnist.npz")) as z:
    arrays = {}
    for split, n in XRAY_COUNTS.items():
      idx = stratified_first(z[f"{split}_labels"], n)
      arrays[f"{split}_images"] = z[f"{split}_images"][idx]
      arrays[f"{split}_labels"] = z[f"{split}_labels"][idx]
  write_npz(os.path.join(out, "xray", "pneumoniamnist_subset.npz"), arrays)


def _ct(shared: str, out: str) -> None:
  ct = os.path.join(shared, "ct")
  _copy(os.path.join(ct, "totalseg_ct.nii.gz"), os.path.join(out, "ct", "images", "totalseg_ct.nii.gz"))
  _copy(os.path.join(ct, "totalseg_ct_small.nii.gz"),
        os.path.join(out, "ct_organs", "images", "totalseg_ct_small.nii.gz"))
  _copy(os.path.join(ct, "totalseg_ct_small_seg.nii.gz"),
        os.path.join(out, "ct_organs", "labels", "totalseg_ct_small.nii.gz"))


def mri_case_ids(shared: str) -> list[str]:
  """The demo's hippocampus cases: paired, no intensity outlier, every k-th by id, MRI_CASES of them."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  root = os.path.join(shared, "mri", "hippocampus")
  images = sorted(f for f in os.listdir(os.path.join(root, "images")) if f.endswith(".nii.gz"))
  labels = set(os.listdir(os.path.join(root, "labels")))
  clean = []
  for f in images:
    if f not in labels:
      continue
    vol = np.asarray(nib.load(os.path.join(root, "images", f)).dataobj)
    if np.all(np.isfinite(vol)) and float(vol.max()) < MRI_OUTLIER_MAX:
      clean.append(f)
  step = max(1, len(clean) // MRI_CASES)
  return clean[::step][:MRI_CASES]


def _mri(shared: str, out: str) -> None:
  root = os.path.join(shared, "mri", "hippocampus")
  for f in mri_case_ids(shared):
    _copy(os.path.join(root, "images", f), os.path.join(out, "mri", "images", f))
    _copy(os.path.join(root, "labels", f), os.path.join(out, "mri", "labels", f))


def _pathology(shared: str, out: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(shared, "pathology", "he_tiles_64px.npz")) as z:
    images, slide_id, yx, names = z["images"], z["slide_id"], z["yx"], z["slide_names"]
  folder = os.path.join(out, "pathology", "tiles")
  os.makedirs(folder, exist_ok=True)
  for s, name in enumerate(names):
    stem = os.path.splitext(str(name))[0]
    for i in np.flatnonzero(slide_id == s)[::TILE_STEP]:
      path = os.path.join(folder, f"{stem}_y{int(yx[i, 0]):05d}_x{int(yx[i, 1]):05d}.png")
      Image.fromarray(images[i]).save(path, format="PNG", optimize=False, compress_level=9)
  _copy(os.path.join(shared, "pathology", "wsi", "cmu-1-small-region.svs"),
        os.path.join(out, "pathology", "wsi", "cmu-1-small-region.svs"))


def build(shared: str, out: str) -> dict[str, dict[str, object]]:
  """Writes the corpus into `out` (replacing it) and returns the manifest {path: {bytes, sha256}}.

  It is built in a sibling folder and swapped in at the end, so a failed build leaves `out` intact.
  """
  if not os.path.isfile(os.path.join(shared, "README.md")):
    raise SystemExit(f"--shared {shared!r}: expected the shared data folder (with README.md)")
  out = os.path.abspath(out)
  tmp, old = out + ".building", out + ".old"
  for d in (tmp, old):
    if os.path.isdir(d):
      shutil.rmtree(d)
  os.makedirs(tmp)
  manifest = _build_into(shared, tmp)
  if os.path.isdir(out):
    os.replace(out, old)
  os.replace(tmp, out)
  if os.path.isdir(old):
    shutil.rmtree(old)
  return manifest


def _build_into(shared: str, out: str) -> dict[str, dict[str, object]]:
  _xray(shared, out)
  _ct(shared, out)
  _mri(shared, out)
  _pathology(shared, out)
  with open(os.path.join(out, "ATTRIBUTION.md"), "w") as f:
    f.write(ATTRIBUTION)
  manifest = {}
  for dirpath, _, files in os.walk(out):
    for name in files:
      p = os.path.join(dirpath, name)
      rel = os.path.relpath(p, out).replace(os.sep, "/")
      if rel != "MANIFEST.json":
        manifest[rel] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
  manifest = dict(sorted(manifest.items()))
  with open(os.path.join(out, "MANIFEST.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.write("\n")
  return manifest


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shared", default=os.path.join(os.path.dirname(REPO), "shared", "data"),
                      help="the shared real-data folder (default: ../shared/data)")
  parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the corpus")
  args = parser.parse_args(argv)
  manifest = build(args.shared, args.out)
  total = sum(int(v["bytes"]) for v in manifest.values())
  print(f"wrote {len(manifest)} files, {total / 1e6:.2f} MB, to {args.out}")


if __name__ == "__main__":
  main(sys.argv[1:])
