"""The continual job end to end on the embedded demo data (X-ray then CT, a tiny ViT, 2 steps per stage):
a two-stage run of every method completes and leaves its artefacts, the stage hand-over carries the trunk,
the data-free guard refuses an earlier stage's data (which the test then deletes), PackNet freezes earlier
stages' weights, and a sequence stopped mid-stage resumes to the uninterrupted result."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from invcoss_jax.defaults import load_config_file
from invcoss_jax import data as data_lib
from invcoss_jax import models
from invcoss_jax.continual import guard, packnet, sequence, stages
from invcoss_jax.data.registry import npz_shards_section
from invcoss_jax.jobs import continual as job
from invcoss_jax.continual import params as params_lib
from invcoss_jax.continual.config import METHODS
from invcoss_jax.continual.stages import plan_stages, read_info
from invcoss_jax.train import checkpoint as ckpt_lib
from conftest import tiny_continual_config

STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """Stages of different methods often compile the same program (every first stage, every buffer step):
  a persistent compilation cache for this module only shares those compiles."""
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
         jax.config.jax_persistent_cache_min_entry_size_bytes)
  compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()  # (re)initialise with this folder even if an earlier test compiled
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", old[2])
  compilation_cache.reset_cache()


def load_config(arg):
  return load_config_file(f"configs/continual.py:{arg}")


def _copy_xray(folder) -> str:
  src = data_lib.resolve(ml_collections.ConfigDict(dict(name="demo_xray"))).path
  os.makedirs(folder, exist_ok=True)
  dst = os.path.join(folder, os.path.basename(src))
  shutil.copy(src, dst)
  return dst


class Runs:
  """One uninterrupted two-stage run per method, made on first use and shared by the tests."""

  def __init__(self, root):
    self.root = root
    self.cache = {}
    self.guard_events = []

  def __call__(self, method):
    if method not in self.cache:
      workdir = os.path.join(self.root, method)
      xray = _copy_xray(os.path.join(self.root, f"site_xray_{method}")) if method == "invcoss" else None
      config = tiny_continual_config(method, xray)
      hook = self._delete_site_data if method == "invcoss" else None
      self.cache[method] = (config, workdir, job.run(config, workdir, after_stage=hook))
    return self.cache[method]

  def _delete_site_data(self, stage, info):
    """After stage 1: every way of reading its data fails, then the data is deleted for good."""
    if stage.index != 1:
      return
    path = stage.data[0].path
    for name, touch in (("np.load", lambda: np.load(path)), ("open", lambda: open(path, "rb")),
                        ("input layer", lambda: data_lib.make_train_iterator(stage.data[0], global_batch_size=4,
                                                                             seed=0))):
      try:
        touch()
        self.guard_events.append((name, "read"))
      except guard.DataFreeViolation:
        self.guard_events.append((name, "refused"))
    shutil.rmtree(os.path.dirname(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return Runs(str(tmp_path_factory.mktemp("continual")))


def _final_params(workdir):
  return ckpt_lib.load_trained_stage(workdir)[2]


@pytest.mark.parametrize("method", METHODS)
def test_two_stage_run_of_each_method_completes(runs, method):
  config, workdir, result = runs(method)
  assert not result["stopped"]
  names = [s["name"] for s in result["stages"]]
  assert names == (["stage_1_joint"] if method == "joint" else ["stage_1_xray", "stage_2_ct"])
  for info in result["stages"]:
    stage_dir = os.path.join(workdir, info["name"])
    assert info["done"] and info["method"] == method
    assert os.path.isfile(os.path.join(stage_dir, "config.json"))
    assert ckpt_lib.make_manager(stage_dir, read_only=True).latest_step() == info["steps"]
    losses = result["losses"][info["name"]]
    assert sorted(losses) == list(range(1, info["steps"] + 1)) and np.all(np.isfinite(list(losses.values())))
  with open(os.path.join(workdir, "storage.json")) as f:
    storage = json.load(f)
  assert sorted(storage) == sorted(names)
  first = storage[names[0]]
  s1 = os.path.join(workdir, names[0])

  if method == "joint":
    info = result["stages"][0]
    assert info["modalities"] == ["xray", "ct"] and info["image_shapes"] == [[16, 16, 3], [8, 16, 16, 1]]
    assert first["retained_bytes"] == 0
  elif method == "invcoss":
    # Stage 1 retains its statistics and (invert_with='own') its synthetic set, read back by the input layer.
    assert first["retained_kind"] == "statistics+synthetic"
    assert first["retained_bytes"] == first["statistics_bytes"] + first["synthetic_bytes"]
    assert first["statistics_bytes"] == os.path.getsize(os.path.join(s1, "statistics.npz")) > 0
    assert first["synthetic_bytes"] >= 8 * 16 * 16 * 3 * 4
    synth = npz_shards_section(config.continual.datasets.xray, os.path.join(s1, "synthetic"))
    assert data_lib.num_examples(synth) == 8 and data_lib.image_shape(synth) == (16, 16, 3)
    assert os.path.isfile(os.path.join(workdir, "stage_2_ct", "statistics.npz"))
  elif method == "noise":
    # The control keeps what invcoss keeps, but its set is the generator's output at initialisation, drawn
    # from the key inversion would start from (nothing optimised), and stage 2 replays it.
    from invcoss_jax.inversion import engine, stage as inv_stage
    assert first["retained_kind"] == "statistics+synthetic"
    synth = npz_shards_section(config.continual.datasets.xray, os.path.join(s1, "synthetic"))
    assert data_lib.num_examples(synth) == 8
    with open(os.path.join(s1, inv_stage.SUMMARY_FILE)) as f:
      assert json.load(f)["optimised"] is False
    stored = np.concatenate([np.load(p)["images"] for p in sorted(
        os.path.join(s1, "synthetic", n) for n in os.listdir(os.path.join(s1, "synthetic")))])
    inv = engine.resolve_grey(config.inversion, "xray")
    expected = engine.generator_at_init(inv, image_shape=(16, 16, 3), rng=jax.random.key(int(config.seed) + 1009),
                                        num_samples=8)
    np.testing.assert_allclose(stored, expected, rtol=1e-6, atol=1e-6)
    assert np.all(stored[..., 0] == stored[..., 1])  # the grey prior, as invcoss's generator
  elif method in ("er", "medcoss"):
    with open(os.path.join(s1, stages.BUFFER_INFO)) as f:
      buf = json.load(f)
    assert buf["num_examples"] == (75 if method == "er" else 75) and len(set(buf["indices"])) == 75
    assert first["retained_kind"] == "real_buffer" and first["retained_bytes"] >= 75 * 16 * 16 * 3 * 4
    assert first["real_buffer_equivalent_bytes"] == 75 * 16 * 16 * 3 * 4
    if method == "medcoss":
      assert buf["clusters"] == 15  # int(1500 * 0.01), 5 nearest each
    assert not os.path.exists(os.path.join(workdir, "stage_2_ct", stages.BUFFER_DIR))  # the last stage keeps nothing
  elif method == "ewc":
    saved = params_lib.load_tree_npz(os.path.join(s1, stages.EWC_FILE))
    assert set(saved) == {"anchor", "fisher"} and "decoder" not in saved["fisher"]
    assert all(np.all(f >= 0) for f in jax.tree.leaves(saved["fisher"]))
    assert any(np.any(f > 0) for f in jax.tree.leaves(saved["fisher"]))
    assert first["retained_kind"] == "ewc" and first["retained_bytes"] > 0
  elif method == "packnet":
    owners1 = params_lib.load_tree_npz(os.path.join(s1, stages.PACKNET_FILE))["owners"]
    p1, p2 = params_lib.flatten(_final_params(s1)), params_lib.flatten(_final_params(os.path.join(workdir, "stage_2_ct")))
    frozen = 0
    for path, own in params_lib.flatten(owners1).items():
      mine = own == 1
      np.testing.assert_array_equal(np.asarray(p2[path])[mine], np.asarray(p1[path])[mine])  # frozen bit-exactly
      frozen += int(mine.sum())
      if packnet.is_prunable(path, own) and packnet.used_by(path, {2}):
        assert np.all(np.asarray(p1[path])[own == 0] == 0)  # released weights were zeroed
    assert frozen > 0
    owners2 = params_lib.load_tree_npz(os.path.join(workdir, "stage_2_ct", stages.PACKNET_FILE))["owners"]
    assert all(np.all(o > 0) for p, o in params_lib.flatten(owners2).items() if packnet.used_by(p, {3}))


def test_stage_hand_over_carries_the_trunk(runs):
  config, workdir, _ = runs("seqssl")
  plan = plan_stages(config, workdir)
  model = models.build_mae(config.model)
  p1 = params_lib.flatten(_final_params(plan[0].workdir))
  start = params_lib.flatten(sequence.initial_params(config, plan[1], plan[:1], model)[0])
  assert set(start) == set(p1)
  carried = [k for k in start if not params_lib.is_decoder_key(k.split("/")[0])]
  assert any(k.startswith("encoder/") for k in carried) and "patch_embed_2d/kernel" in carried
  for k in carried:
    np.testing.assert_array_equal(np.asarray(start[k]), np.asarray(p1[k]))
  decoder = [k for k in start if params_lib.is_decoder_key(k.split("/")[0])]
  assert decoder and any(not np.array_equal(np.asarray(start[k]), np.asarray(p1[k])) for k in decoder)
  config = ml_collections.ConfigDict(config.to_dict())  # the run is shared: change a copy
  config.continual.reinit_decoder = False
  kept = params_lib.flatten(sequence.initial_params(config, plan[1], plan[:1], model)[0])
  for k in decoder:
    np.testing.assert_array_equal(np.asarray(kept[k]), np.asarray(p1[k]))


def test_data_free_guard_refuses_earlier_stage_data(runs):
  config, workdir, result = runs("invcoss")
  assert runs.guard_events == [("np.load", "refused"), ("open", "refused"), ("input layer", "refused")]
  # The site's X-rays were deleted after stage 1, yet stage 2 (CT with the synthetic X-ray buffer) finished.
  assert not os.path.exists(os.path.dirname(config.continual.datasets.xray.path))
  assert read_info(plan_stages(config, workdir)[1])["done"]


def test_resume_mid_sequence_matches_uninterrupted_run(runs, tmp_path):
  config, ref_dir, ref = runs("er")
  workdir = str(tmp_path / "resumed")
  # Stage 1 as the reference run left it (finished, with its buffer), then stage 2 stops after step 1.
  shutil.copytree(os.path.join(ref_dir, "stage_1_xray"), os.path.join(workdir, "stage_1_xray"))
  stopped = job.run(config, workdir, stop_at=(2, 1))
  assert stopped["stopped"] and [s["name"] for s in stopped["stages"]] == ["stage_1_xray"]
  assert "stage_1_xray" not in stopped["losses"]
  stage2 = os.path.join(workdir, "stage_2_ct")
  assert ckpt_lib.make_manager(stage2, read_only=True).latest_step() == 1 and read_info(
      plan_stages(config, workdir)[1]) is None
  resumed = job.run(config, workdir)
  assert not resumed["stopped"] and "stage_1_xray" not in resumed["losses"]  # stage 1 is not redone
  assert sorted(resumed["losses"]["stage_2_ct"]) == [2]
  np.testing.assert_allclose(resumed["losses"]["stage_2_ct"][2], ref["losses"]["stage_2_ct"][2], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(_final_params(stage2)), jax.tree.leaves(_final_params(os.path.join(ref_dir, "stage_2_ct")))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_bad_options_raise_clear_errors(tmp_path):
  c = tiny_continual_config("seqssl")
  c.continual.method = "lwf"
  with pytest.raises(ValueError, match="config.continual.method='lwf'"):
    job.run(c, str(tmp_path / "a"))
  c = tiny_continual_config("seqssl")
  c.continual.order = ("xray", "ultrasound")
  with pytest.raises(ValueError, match="ultrasound"):
    job.run(c, str(tmp_path / "b"))
  c = tiny_continual_config("seqssl")
  c.continual.datasets.ct = ml_collections.ConfigDict(c.continual.datasets.xray.to_dict())
  with pytest.raises(ValueError, match="same files"):
    job.run(c, str(tmp_path / "c"))


def test_steps_per_dispatch_trains_the_same_stage_and_resumes_inside_it(runs, tmp_path):
  """Blocks of 4 steps per dispatch (core.jit_block), stopped and resumed mid-stage, against one step at a
  time: the same losses and the same final model."""
  config, ref_dir, _ = runs("er")
  config = ml_collections.ConfigDict(config.to_dict())
  config.continual.stage_steps, config.logging.log_every_steps = (2, 20), 8
  out = {}
  for k in (1, 4):
    workdir = str(tmp_path / f"k{k}")
    shutil.copytree(os.path.join(ref_dir, "stage_1_xray"), os.path.join(workdir, "stage_1_xray"))
    config.train.steps_per_dispatch = k
    losses = {}
    if k > 1:
      stopped = job.run(config, workdir, stop_at=(2, 14))
      assert stopped["stopped"]
      losses.update(stopped["losses"]["stage_2_ct"])
    losses.update(job.run(config, workdir)["losses"]["stage_2_ct"])
    out[k] = losses, _final_params(os.path.join(workdir, "stage_2_ct"))
  assert sorted(out[4][0]) == sorted(out[1][0]) == list(range(1, 21))
  np.testing.assert_allclose([out[4][0][s] for s in range(1, 21)], [out[1][0][s] for s in range(1, 21)], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out[4][1]), jax.tree.leaves(out[1][1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
