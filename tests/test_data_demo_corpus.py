"""The embedded demo corpus: contents, licences, package data, reproducible rebuild, every name loads."""

import fnmatch
import hashlib
import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

from invcoss_jax import data

DEMO = pathlib.Path(data.DEMO_ROOT)
REPO = pathlib.Path(__file__).resolve().parents[1]


def _manifest():
  return json.loads((DEMO / "MANIFEST.json").read_text())


def _files():
  return sorted(p.relative_to(DEMO).as_posix() for p in DEMO.rglob("*") if p.is_file()
                and "__pycache__" not in p.parts)


def test_corpus_is_small_and_covers_four_modalities():
  sizes = {f: (DEMO / f).stat().st_size for f in _files()}
  assert sum(sizes.values()) <= 15e6
  tops = {f.split("/")[0] for f in sizes}
  assert {"xray", "ct", "ct_organs", "mri", "pathology"} <= tops
  assert any(f.endswith(".nii.gz") for f in sizes) and any(f.endswith(".svs") for f in sizes)
  assert any(f.endswith(".png") for f in sizes) and any(f.endswith(".npz") for f in sizes)


def test_attribution_carries_the_licences():
  text = (DEMO / "ATTRIBUTION.md").read_text()
  for needle in ["CC BY 4.0", "Apache-2.0", "CC BY-SA 4.0", "CC0 1.0", "MedMNIST", "TotalSegmentator",
                 "Medical Segmentation Decathlon", "OpenSlide", "TCGA"]:
    assert needle in text, needle


def test_manifest_matches_the_files_and_package_data_patterns():
  manifest = _manifest()
  assert sorted(manifest) == [f for f in _files() if f != "MANIFEST.json"]
  for f, meta in manifest.items():
    blob = (DEMO / f).read_bytes()
    assert len(blob) == meta["bytes"] and hashlib.sha256(blob).hexdigest() == meta["sha256"], f
  # pyproject's package data: invcoss_jax = ["data/demo/*", "data/demo/**/*"].
  patterns = ["data/demo/*", "data/demo/**/*"]
  for f in _files():
    rel = f"data/demo/{f}"
    assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel
  assert "data/demo/*" in (REPO / "pyproject.toml").read_text()


@pytest.mark.needs_shared
def test_rebuild_from_shared_data_is_byte_identical(shared_data, tmp_path):
  spec = importlib.util.spec_from_file_location("build_demo_corpus", REPO / "scripts" / "build_demo_corpus.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  rebuilt = mod.build(str(shared_data), str(tmp_path / "demo"))
  assert rebuilt == _manifest()
  # The selected hippocampus cases are clean: paired and without intensity outliers.
  assert sum(f.startswith("mri/images/") for f in rebuilt) == 40
  assert not {"hippocampus_118.nii.gz", "hippocampus_184.nii.gz"} & set(os.listdir(DEMO / "mri" / "images"))


@pytest.mark.parametrize("name,count,shape", [
    ("demo_xray", 1500, (32, 32, 3)),
    ("demo_pneumonia", 1500, (32, 32, 3)),
    ("demo_path", 143, (32, 32, 3)),
    ("demo_ct", 27, (16, 32, 32, 1)),
    ("demo_mri", None, (16, 32, 32, 1)),
    ("demo_hippocampus", None, (16, 32, 32, 1)),
    ("demo_ct_organs", 2, (16, 32, 32, 1)),
])
def test_every_registered_name_loads(name, count, shape):
  c = data.data_config()
  c.name, c.image_size, c.volume_shape = name, 32, (16, 32, 32)
  assert data.image_shape(c) == shape
  n = data.num_examples(c)
  assert n == count if count is not None else n > 0
  src = data.make_source(c)
  example = data.make_preprocessor(c)(src[0])
  assert example["image"].shape == shape and example["image"].dtype == np.float32
  assert ("label" in example) == (name in ("demo_xray", "demo_pneumonia"))
  assert ("mask" in example) == (name in ("demo_hippocampus", "demo_ct_organs"))
