"""The Colab notebooks run end to end on the CPU (nbclient), with the small preset they pick there, and leave the
artefacts they describe."""

import json
import os
import re

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")


def _execute(name, workdir, monkeypatch, timeout=900):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  # The kernel inherits this environment: a CPU with one device, as a Colab CPU runtime has.
  monkeypatch.setenv("INVCOSS_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  monkeypatch.setenv("XLA_FLAGS", " ".join(kept + ["--xla_force_host_platform_device_count=1"]))
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                          resources={"metadata": {"path": COLAB}}).execute()
  return nb


def _text(nb) -> str:
  """Everything the notebook printed (stdout only: log lines on stderr may interleave with it)."""
  return "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", [])
                 if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_pretrain_and_invert_notebook(tmp_path, monkeypatch):
  nb = _execute("01_pretrain_and_invert.ipynb", tmp_path, monkeypatch)
  text = _text(nb)
  assert "cpu: 1 x cpu" in text
  loss = re.search(r"loss ([0-9.]+) -> ([0-9.]+)", text)
  assert loss and float(loss.group(2)) < float(loss.group(1)), text
  assert (tmp_path / "xray_stage" / "statistics.npz").is_file()
  with open(tmp_path / "xray_inverted" / "inversion.json") as f:
    summary = json.load(f)
  assert summary["l_norm_end"] < summary["l_norm_start"]
  images = np.load(tmp_path / "xray_inverted" / "synthetic" / "shard_00000.npz")["images"]
  assert images.shape == (16, 32, 32, 3) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0
  assert (tmp_path / "real_vs_synthetic.png").stat().st_size > 10_000
  # Both grids were drawn (an image output in the last code cell).
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for o in nb.cells[-2].get("outputs", []))


def test_continual_forgetting_notebook(tmp_path, monkeypatch):
  nb = _execute("02_continual_forgetting.ipynb", tmp_path, monkeypatch)
  text = _text(nb)
  assert "cpu: 1 x cpu" in text
  run = tmp_path / "invcoss"
  assert {"stage_1_xray", "stage_2_path", "storage.json"} <= {p.name for p in run.iterdir()}
  with open(run / "storage.json") as f:
    storage = json.load(f)
  # Stage 1 keeps its statistics and its synthetic set (no real image); stage 2 replayed those X-rays.
  assert storage["stage_1_xray"]["retained_kind"] == "statistics+synthetic"
  assert storage["stage_1_xray"]["real_buffer_bytes"] == 0 and storage["stage_1_xray"]["synthetic_bytes"] > 0
  with open(tmp_path / "forgetting" / "forgetting.json") as f:
    matrix = json.load(f)
  stages = matrix["methods"]["InvCoSS"]["stages"]
  assert [(s["stage"], s["modality"]) for s in stages] == [(1, "xray"), (2, "path")]
  for s in stages:
    acc = s["tasks"]["pneumonia"]["mean"]["acc"]
    assert 0.0 <= acc <= 1.0
    assert f"after stage {s['stage']} ({s['modality']}): {{'pneumonia': {round(acc, 4)}}}" in text
  assert (tmp_path / "forgetting.png").stat().st_size > 5_000
  assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
