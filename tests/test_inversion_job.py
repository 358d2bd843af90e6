"""The `stats` and `invert` jobs end to end on a demo X-ray stage (trainer -> statistics -> inversion -> input
layer), over the 4 simulated devices."""

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from invcoss_jax import data as data_lib
from invcoss_jax import jobs
from invcoss_jax.jobs import inversion as inversion_job
from invcoss_jax.inversion import statistics

REPO = pathlib.Path(__file__).resolve().parents[1]


def demo_config():
  spec = importlib.util.spec_from_file_location("xray_config", REPO / "configs" / "xray.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("demo")
  c.model.depth = 2
  c.total_steps = 4
  c.checkpoint.every_steps = 4
  c.logging.log_every_steps = 2
  c.logging.image_every_steps = 100
  return c


def invert_config(stage_dir, num_samples=12):
  c = demo_config()
  c.mode = "invert"
  c.init_from = str(stage_dir)
  inv = c.inversion
  inv.invunet.channels = (4, 8, 16)
  inv.schedule_2d.update(batch_size=8, steps=6, init_steps=6, latent_dim=16)
  inv.lr_generator = 1e-2
  inv.num_samples = num_samples
  inv.shard_size = 8
  inv.log_every_steps = 2
  return c


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
  """A demo X-ray stage trained for 4 steps; `pretrain` ends with the statistics pass."""
  workdir = tmp_path_factory.mktemp("xray_stage")
  jobs.run(demo_config(), workdir)
  return workdir


@pytest.fixture(scope="module")
def inverted(stage, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("xray_invert")
  summary = jobs.run(invert_config(stage), workdir)
  return workdir, summary


def test_stats_job_writes_statistics_and_sizes(stage):
  c = demo_config()
  n = data_lib.num_examples(c.data)
  stats = statistics.load_statistics(stage / "statistics.npz")
  assert stats.count == n
  assert stats.mean.shape == (2, 1 + 16, c.model.width)
  summary = json.loads((stage / "statistics.json").read_text())
  assert summary["statistics_bytes"] == 2 * stats.mean.size * 4 + 8 == statistics.statistics_nbytes(stats)
  assert summary["file_bytes"] == os.path.getsize(stage / "statistics.npz")
  per_image = 32 * 32 * 3 * 4
  assert summary["replay_buffer_bytes"] == {"0.01": int(0.01 * n) * per_image, "0.05": int(0.05 * n) * per_image,
                                            "0.1": int(0.1 * n) * per_image}
  assert statistics.replay_buffer_nbytes(c.data, 0.05) == int(0.05 * n) * per_image
  # The job on its own (params from the checkpoint) reproduces the file.
  again = inversion_job.run_stats(c, stage)
  np.testing.assert_allclose(again.mean, stats.mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(again.var, stats.var, rtol=1e-5, atol=1e-6)


def test_invert_job_outputs_read_back_by_the_input_layer(inverted):
  workdir, summary = inverted
  shards = sorted(os.listdir(workdir / "synthetic"))
  assert shards == ["shard_00000.npz", "shard_00001.npz"]
  images = np.concatenate([np.load(workdir / "synthetic" / s)["images"] for s in shards])
  assert images.shape == (12, 32, 32, 3) and images.dtype == np.float32
  assert np.all((images >= 0) & (images <= 1))
  # The input layer reads the shards back unchanged.
  d = data_lib.data_config()
  d.update(name="folder", format="npz", path=str(workdir / "synthetic"), modality="xray", image_size=32,
           preprocessed=True)
  assert data_lib.num_examples(d) == 12
  back = np.concatenate([b["image"] for b in data_lib.make_eval_iterator(d, batch_size=5)])
  np.testing.assert_allclose(back, images, atol=1e-6)
  # Grid, summary and per-batch L_norm.
  grid = np.asarray(Image.open(workdir / "synthetic_grid.png"))
  assert grid.shape == (3 * 34 + 2, 4 * 34 + 2, 3)  # 12 images of 32x32 in a 3x4 grid with 2-pixel gaps
  saved = json.loads((workdir / "inversion.json").read_text())
  assert saved["num_samples"] == 12 and saved["l_norm_end"] < saved["l_norm_start"]
  assert np.isfinite(saved["l_norm_synthetic_set"]) and saved["l_norm_synthetic_set"] > 0
  assert summary["l_norm_synthetic_set"] == saved["l_norm_synthetic_set"]


def test_invert_job_writes_tensorboard_curves_of_every_term(inverted):
  from tensorboard.backend.event_processing import event_accumulator
  workdir, _ = inverted
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
  expected = {f"inversion/{k}" for k in ("total", "task", "norm", "img", "rep", "l_norm_synthetic_set")}
  assert expected <= tags
  steps = [e.step for e in acc.Tensors("inversion/norm")]
  assert steps[:4] == [0, 2, 4, 6]


def test_invert_job_replaces_old_shards_and_checks_options(stage, inverted, tmp_path):
  workdir, _ = inverted
  jobs.run(invert_config(stage, num_samples=4), workdir)
  assert sorted(os.listdir(workdir / "synthetic")) == ["shard_00000.npz"]
  assert not [p for p in os.listdir(workdir) if p.startswith(".tmp-") or p.startswith(".old-")]
  c = invert_config(stage)
  c.init_from = ""
  with pytest.raises(ValueError, match="config.init_from"):
    jobs.run(c, tmp_path / "x")
  c = invert_config(tmp_path)
  with pytest.raises(FileNotFoundError):
    jobs.run(c, tmp_path / "y")
