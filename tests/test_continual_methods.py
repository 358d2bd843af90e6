"""Continual methods as registered objects (invcoss_jax/continual/methods/): the registry and the groups derived
from it, no branch on a method's name in continual/, a new method written in one file (this one) running
through the `continual` job, and one buffer count shared by the buffers, inversion and the audit."""

import ast
import glob
import json
import math
import os

import numpy as np
import pytest

from invcoss_jax import data as data_lib
from invcoss_jax import npz_io
from invcoss_jax.audit.config import audit_config
from invcoss_jax.config_checks import ConfigError
from invcoss_jax.continual import buffers, methods, sequence
from invcoss_jax.continual import config as continual_config_lib
from invcoss_jax.continual.stages import BUFFER_DIR, finished_info, plan_stages, stage_config
from invcoss_jax.data.config import data_config
from invcoss_jax.data.registry import npz_shards_section
from invcoss_jax.defaults import load_config_file

from conftest import tiny_continual_config
from invcoss_jax.inversion import stage as inv_stage
from invcoss_jax.inversion import statistics
from invcoss_jax.inversion.config import inversion_config
from invcoss_jax.jobs import audit as audit_job
from invcoss_jax.jobs import continual as job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTIN = ("cassle", "er", "ewc", "invcoss", "joint", "medcoss", "noise", "packnet", "seqssl")


def test_registry_holds_every_method_and_the_groups_follow_their_declarations():
  assert set(BUILTIN) <= set(methods.names())
  assert set(continual_config_lib.METHODS) == set(methods.names())
  # The groups the code used to spell out, now computed from each method's declarations.
  assert set(continual_config_lib.SYNTHETIC_METHODS) == {"invcoss", "noise"}
  assert set(continual_config_lib.REAL_BUFFER_METHODS) == {"er", "medcoss"}
  assert set(continual_config_lib.REPLAY_METHODS) == {"invcoss", "noise", "er", "medcoss"}
  assert set(continual_config_lib.TEACHER_METHODS) == {"invcoss", "noise", "er", "medcoss", "cassle"}
  assert [n for n in BUILTIN if not methods.get(n).sequential] == ["joint"]
  assert {n: methods.get(n).text_buffer for n in BUILTIN if methods.get(n).text_buffer} == dict(
      er="random", medcoss="kmeans", invcoss="kmeans", noise="kmeans")
  assert methods.get("noise").optimise is False and methods.get("invcoss").optimise is True
  with pytest.raises(ConfigError, match=r"config.continual.method='lwf': expected one of \['cassle', 'er'"):
    methods.get("lwf")
  with pytest.raises(ValueError, match="'er' is already registered"):
    methods.register(methods.Method("er"))
  with pytest.raises(TypeError, match="methods.Method"):
    methods.register("seqssl")


def test_continual_has_no_branch_on_a_method_name():
  """Adding a method touches no module of continual/ outside methods/: none compares with a method's name
  or a hand-kept group of methods."""
  found = []
  for path in sorted(glob.glob(os.path.join(REPO, "invcoss_jax", "continual", "*.py"))):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if not isinstance(node, ast.Compare):
        continue
      parts = [n for o in [node.left] + list(node.comparators) for n in ast.walk(o)]
      literals = {n.value for n in parts if isinstance(n, ast.Constant)}
      groups = [n for n in parts if isinstance(n, ast.Name) and n.id.endswith("METHODS")]
      if literals & set(BUILTIN) or groups:
        found.append(f"{os.path.basename(path)}:{node.lineno}: {ast.unparse(node)}")
  assert not found, found


# ---------------------------------------------------------------------------------------------------------
# A method in one file: everything below (the class and its registration) is all it takes.


class KeepFirst(methods.Method):
  """Keeps the first `continual.buffer_fraction` of every stage's examples, in reading order, as its real
  buffer and replays them (distilled to the frozen previous model) in every later stage."""
  keeps = "the first examples of a stage"
  replays = "real"
  teacher = True

  def end_stage(self, end):
    if end.text or end.last:
      return
    n = buffers.buffer_size(end.n_current[0], float(end.cfg.continual.buffer_fraction))
    images = buffers.gather_examples(end.eval_batches(64), np.arange(n))
    npz_io.write_shards(os.path.join(end.stage.workdir, BUFFER_DIR), images, 64)

  def replay_set(self, cfg, stage, source, earlier, model, params, mesh):
    n = buffers.buffer_size(finished_info(source)["num_examples"][0], float(cfg.continual.buffer_fraction))
    return os.path.join(source.workdir, BUFFER_DIR), n

  def retains(self, c, text):
    return ("real_buffer",)


@pytest.fixture
def keep_first():
  """KeepFirst registered as `keep_first` for this test only."""
  # Added to the registry itself and removed after: a copy swapped in would also catch the built-in methods
  # imported lazily during the test, and later tests would find their modules imported but unregistered.
  yield methods.register(KeepFirst("keep_first"))
  methods._REGISTRY.pop("keep_first", None)


def test_a_method_registered_in_one_file_runs_through_the_continual_job(keep_first, tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  assert "keep_first" in methods.names() and "keep_first" in continual_config_lib.REPLAY_METHODS
  config = tiny_continual_config("keep_first")  # a registered method is a preset of configs/continual.py too
  assert config.continual.method == "keep_first"
  workdir = str(tmp_path / "keep_first")
  result = job.run(config, workdir)
  assert not result["stopped"] and [s["method"] for s in result["stages"]] == ["keep_first"] * 2
  s1, s2 = plan_stages(config, workdir)
  # Stage 1 kept its first 75 X-rays (5 % of 1500), exactly as the input layer reads them.
  section = npz_shards_section(config.continual.datasets.xray, os.path.join(s1.workdir, BUFFER_DIR))
  assert data_lib.num_examples(section) == 75
  kept = next(iter(data_lib.make_eval_iterator(section, batch_size=75, process_index=0, process_count=1)))
  first = next(iter(data_lib.make_eval_iterator(config.continual.datasets.xray, batch_size=75, process_index=0,
                                                process_count=1)))
  np.testing.assert_array_equal(kept["image"], first["image"])
  storage = json.loads(open(os.path.join(workdir, "storage.json")).read())
  assert storage[s1.name]["retained_kind"] == "real_buffer" and storage[s1.name]["retained_bytes"] > 0
  assert storage[s2.name]["retained_bytes"] == 0  # the last stage keeps nothing
  # Stage 2 replayed it: one buffer source of 75 samples, distilled to the frozen stage-1 model every step.
  (source,) = sequence.buffer_sources(stage_config(config, s2), s2, [s1])
  assert (source.name, source.num_examples) == (s1.name, 75)
  acc = event_accumulator.EventAccumulator(s2.workdir, size_guidance={"tensors": 0})
  acc.Reload()
  assert len(acc.Tensors("train/loss_distill")) == 2


# ---------------------------------------------------------------------------------------------------------
# One buffer count.


@pytest.mark.parametrize("fraction", [0.0999, 0.0333, 0.05])
def test_buffers_inversion_and_audit_count_a_fraction_alike(fraction, monkeypatch):
  """int(f x N) everywhere: 0.0999 x 1500 = 149.85 and 0.0333 x 1500 = 49.95 round up but truncate down (the
  audit rounded, so its `er` buffer held one sample more than the continual job's)."""
  n = 1500
  want = int(fraction * n)
  if fraction != 0.05:
    assert round(fraction * n) == want + 1
  xray = data_config()
  xray.name = "demo_xray"
  assert data_lib.num_examples(xray) == n
  assert buffers.buffer_size(n, fraction) == len(buffers.random_indices(n, fraction, seed=0)) == want
  inv = inversion_config()
  inv.num_samples = 0
  assert inv_stage.num_synthetic_samples(inv, xray, fraction) == want
  assert statistics.replay_buffer_nbytes(xray, fraction) == want * math.prod(data_lib.image_shape(xray)) * 4
  # The audit's replay buffer of method er (drawn when config.audit.buffer_path is empty).
  monkeypatch.setattr(audit_job, "gather", lambda data_cfg, idx, bs: np.zeros((len(idx), 1), np.float32))
  monkeypatch.setattr(audit_job, "shard_folder", lambda path, option: path)
  monkeypatch.setattr(audit_job, "_npz_set", lambda *a, **k: dict(images=np.zeros((1, 1)), indices=[0], size=1,
                                                                    source="synthetic"))
  a = audit_config()
  a.buffer_path = ""
  sets = audit_job._query_sets(a, fraction, xray, xray, xray, "/nonexistent", n, (32, 32, 3),
                               np.random.default_rng(0))
  assert sets["er_buffer"]["size"] == want
