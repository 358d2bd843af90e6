"""Continual pre-training, the pure parts: k-means and random buffers, losses, mixup, PackNet masks, the
parameter hand-over, batch splitting, the data-free guard and the checkpointable streams (tiny, no training)."""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from invcoss_jax import data as data_lib
from invcoss_jax.continual import buffers, guard, losses, packnet
from invcoss_jax.continual import params as params_lib
from invcoss_jax.continual.streams import StageStreams, Stream, split_batch


# --- buffers ----------------------------------------------------------------------------------------------


def _blobs(rng, centers, radii_per_blob):
  """Points placed symmetrically (+-r along each axis) around each centre, so every blob's mean is its centre
  and the nearest points to a centroid are those of the smallest radii."""
  feats, radius, blob = [], [], []
  for b, (c, radii) in enumerate(zip(centers, radii_per_blob)):
    for r in radii:
      for axis in range(len(c)):
        for sign in (1.0, -1.0):
          p = np.array(c, np.float64)
          p[axis] += sign * r
          feats.append(p)
          radius.append(r)
          blob.append(b)
  order = rng.permutation(len(feats))
  return np.asarray(feats)[order], np.asarray(radius)[order], np.asarray(blob)[order]


def test_kmeans_buffer_picks_the_members_nearest_each_centroid():
  rng = np.random.default_rng(0)
  centers = [(0.0, 0.0), (100.0, 0.0), (0.0, 100.0), (100.0, 100.0)]
  # 100 points per blob (25 radii x 4 directions), radii distinct so "nearest" is unambiguous.
  radii = [rng.permutation(np.linspace(0.5, 20.0, 25)) for _ in centers]
  feats, radius, blob = _blobs(rng, centers, radii)
  assert len(feats) == 400  # clusters = int(400 * 0.01) = 4, per cluster int(400 * 0.05 // 4) = 5
  idx, km = buffers.kmeans_indices(feats, cluster_fraction=0.01, fraction=0.05, seed=0, n_init=4)
  assert km.n_clusters == 4 and len(idx) == 20 and len(set(idx.tolist())) == 20
  np.testing.assert_allclose(np.sort(km.cluster_centers_, axis=0), np.sort(np.asarray(centers), axis=0), atol=1e-6)
  for b in range(4):
    members = np.flatnonzero(blob == b)
    chosen = np.intersect1d(idx, members)
    # The 5 chosen of each blob are its points of the smallest radius (two radii x 4 directions hold 8
    # candidates at the two smallest radii; the 5 chosen all lie at one of them).
    smallest = np.sort(np.unique(radius[members]))[:2]
    assert len(chosen) == 5 and np.all(np.isin(radius[chosen], smallest)), (b, radius[chosen])
    # And against the definition: the 5 members nearest the fitted centroid of their cluster.
    label = km.labels_[members[0]]
    dist = np.linalg.norm(feats[members] - km.cluster_centers_[label], axis=1)
    np.testing.assert_allclose(np.sort(np.linalg.norm(feats[chosen] - km.cluster_centers_[label], axis=1)),
                               np.sort(dist)[:5])


def test_kmeans_plan_follows_medcoss_and_buffer_sizes():
  assert buffers.kmeans_plan(10000, 0.01, 0.05) == (100, 5)
  assert buffers.kmeans_plan(10000, 0.01, 0.10) == (100, 10)
  assert buffers.kmeans_plan(27, 0.01, 0.05) == (1, 1)  # tiny stages keep one cluster and one sample
  for frac in (0.01, 0.05, 0.10):
    idx = buffers.random_indices(1500, frac, seed=3)
    assert len(idx) == int(1500 * frac) and len(np.unique(idx)) == len(idx) and idx.max() < 1500
  assert not np.array_equal(buffers.random_indices(1500, 0.05, 1), buffers.random_indices(1500, 0.05, 2))
  with pytest.raises(ValueError, match="buffer_fraction"):
    buffers.buffer_size(100, 0.0)


def test_gather_examples_returns_the_chosen_examples_in_order():
  x = np.arange(23, dtype=np.float32).reshape(23, 1, 1, 1) * np.ones((1, 2, 2, 3), np.float32)
  batches = [{"image": x[i:i + 5]} for i in range(0, 23, 5)]
  got = buffers.gather_examples(batches, [21, 0, 7, 6, 13])
  np.testing.assert_array_equal(got[:, 0, 0, 0], [0, 6, 7, 13, 21])
  with pytest.raises(ValueError, match="yielded only"):
    buffers.gather_examples(batches, [30])


# --- losses -----------------------------------------------------------------------------------------------


def test_feature_distillation_matches_numpy_and_stops_teacher_gradient():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(3, 5, 8)).astype(np.float32), rng.normal(size=(3, 5, 8)).astype(np.float32)
  np.testing.assert_allclose(losses.feature_distillation(jnp.asarray(s), jnp.asarray(t)), np.mean((s - t) ** 2),
                             rtol=1e-6)
  g_t = jax.grad(lambda t_: losses.feature_distillation(jnp.asarray(s), t_))(jnp.asarray(t))
  assert np.all(np.asarray(g_t) == 0)
  g_s = jax.grad(lambda s_: losses.feature_distillation(s_, jnp.asarray(t)))(jnp.asarray(s))
  np.testing.assert_allclose(g_s, 2 * (s - t) / s.size, rtol=1e-5)
  with pytest.raises(ValueError, match="one shape"):
    losses.feature_distillation(jnp.zeros((1, 2, 3)), jnp.zeros((1, 3, 3)))


def test_ewc_penalty_and_weighted_mean_match_numpy():
  rng = np.random.default_rng(2)
  tree = lambda: {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": {"c": rng.normal(size=(5,)).astype(np.float32)}}
  p, a, f = tree(), tree(), jax.tree.map(np.abs, tree())
  ref = 0.5 * sum(np.sum(ff * (pp - aa) ** 2) for pp, aa, ff in zip(jax.tree.leaves(p), jax.tree.leaves(a),
                                                                     jax.tree.leaves(f)))
  np.testing.assert_allclose(losses.ewc_penalty(p, a, f), ref, rtol=1e-5)
  assert float(losses.ewc_penalty(p, p, f)) == 0.0
  np.testing.assert_allclose(losses.sample_weighted_mean([jnp.float32(1.0), jnp.float32(4.0)], [4, 12]),
                             (4 * 1.0 + 12 * 4.0) / 16, rtol=1e-6)


def test_intra_modal_mixup_matches_reference_on_demo_xrays():
  d = data_lib.data_config()
  d.name, d.image_size = "demo_xray", 16
  x = next(iter(data_lib.make_eval_iterator(d, batch_size=6)))["image"]
  mixed, lam, perm = losses.intra_modal_mixup(x, np.random.default_rng(5))
  assert mixed.shape == x.shape and mixed.dtype == np.float32
  assert np.all((lam >= 0) & (lam <= 1)) and sorted(perm.tolist()) == list(range(6))
  for i in range(6):
    np.testing.assert_allclose(mixed[i], lam[i] * x[i] + (1 - lam[i]) * x[perm[i]], rtol=1e-6, atol=1e-7)
  again, _, _ = losses.intra_modal_mixup(x, np.random.default_rng(5))
  np.testing.assert_array_equal(mixed, again)  # a function of the generator's seed


# --- PackNet ----------------------------------------------------------------------------------------------


def _toy_params(rng):
  return {"encoder": {"block_0": {"fc1": {"kernel": rng.normal(size=(6, 10)).astype(np.float32),
                                          "bias": rng.normal(size=(10,)).astype(np.float32)}}},
          "patch_embed_2d": {"kernel": rng.normal(size=(12, 6)).astype(np.float32)},
          "patch_embed_3d": {"kernel": rng.normal(size=(8, 6)).astype(np.float32)},
          "cls_token": rng.normal(size=(1, 1, 6)).astype(np.float32),
          "decoder": {"kernel": rng.normal(size=(6, 6)).astype(np.float32)}}


def test_packnet_prune_keeps_largest_free_weights_and_is_idempotent():
  rng = np.random.default_rng(3)
  params = _toy_params(rng)
  owners = packnet.initial_owners(params)
  assert "decoder" not in owners
  pruned, own1, counts = packnet.prune(params, owners, ranks={2}, stage_index=1, prune_fraction=0.5,
                                       last_stage=False)
  k = pruned["encoder"]["block_0"]["fc1"]["kernel"]
  o = own1["encoder"]["block_0"]["fc1"]["kernel"]
  assert (o == 1).sum() == 30 and np.all(k[o == 0] == 0)
  w = np.abs(params["encoder"]["block_0"]["fc1"]["kernel"])
  assert w[o == 1].min() >= w[o == 0].max()  # the kept half is the larger half
  assert np.all(own1["encoder"]["block_0"]["fc1"]["bias"] == 1)  # small leaves claimed whole
  assert np.all(own1["patch_embed_3d"]["kernel"] == 0)  # a 2D stage leaves the 3D tokenizer free
  np.testing.assert_array_equal(pruned["patch_embed_3d"]["kernel"], params["patch_embed_3d"]["kernel"])
  np.testing.assert_array_equal(pruned["decoder"]["kernel"], params["decoder"]["kernel"])
  again, own_again, _ = packnet.prune(pruned, owners, ranks={2}, stage_index=1, prune_fraction=0.5, last_stage=False)
  for a, b in zip(jax.tree.leaves((again, own_again)), jax.tree.leaves((pruned, own1))):
    np.testing.assert_array_equal(a, b)
  # Masks: training phase = free and used; retraining = kept; stage 2 (3D) cannot touch stage 1's weights.
  m_retrain = packnet.trainable_mask(pruned, own1, ranks={2}, stage_index=1, retrain=True)
  np.testing.assert_array_equal(m_retrain["encoder"]["block_0"]["fc1"]["kernel"], (o == 1).astype(np.float32))
  m2 = packnet.trainable_mask(pruned, own1, ranks={3}, stage_index=2, retrain=False)
  np.testing.assert_array_equal(m2["encoder"]["block_0"]["fc1"]["kernel"], (o == 0).astype(np.float32))
  assert np.all(m2["patch_embed_2d"]["kernel"] == 0) and np.all(m2["patch_embed_3d"]["kernel"] == 1)
  assert np.all(m2["encoder"]["block_0"]["fc1"]["bias"] == 0) and np.all(m2["decoder"]["kernel"] == 1)
  _, own_last, c_last = packnet.prune(pruned, own1, ranks={3}, stage_index=2, prune_fraction=0.5, last_stage=True)
  assert c_last["released"] == 0 and np.all(own_last["encoder"]["block_0"]["fc1"]["kernel"] > 0)


# --- hand-over --------------------------------------------------------------------------------------------


def test_hand_over_carries_encoder_side_and_reinitialises_decoder():
  rng = np.random.default_rng(4)
  prev, fresh = _toy_params(rng), _toy_params(rng)
  fresh["decoder_pred_3d"] = {"kernel": np.zeros((6, 2), np.float32)}
  out = params_lib.hand_over(prev, fresh, reinit_decoder=True, where="t")
  np.testing.assert_array_equal(out["encoder"]["block_0"]["fc1"]["kernel"], prev["encoder"]["block_0"]["fc1"]["kernel"])
  np.testing.assert_array_equal(out["cls_token"], prev["cls_token"])
  np.testing.assert_array_equal(out["decoder"]["kernel"], fresh["decoder"]["kernel"])
  assert "decoder_pred_3d" in out  # missing in the previous tree: taken from the fresh one
  kept = params_lib.hand_over(prev, fresh, reinit_decoder=False, where="t")
  np.testing.assert_array_equal(kept["decoder"]["kernel"], prev["decoder"]["kernel"])
  bad = dict(prev, cls_token=np.zeros((1, 1, 7), np.float32))
  with pytest.raises(ValueError, match="cls_token.*same for every stage"):
    params_lib.hand_over(bad, fresh, reinit_decoder=True, where="t")


def test_tree_npz_round_trip(tmp_path):
  rng = np.random.default_rng(5)
  p = _toy_params(rng)
  params_lib.save_tree_npz(str(tmp_path / "t.npz"), anchor=p, fisher=jax.tree.map(np.abs, p))
  back = params_lib.load_tree_npz(str(tmp_path / "t.npz"))
  for a, b in zip(jax.tree.leaves(back["anchor"]), jax.tree.leaves(p)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match="did not finish"):
    params_lib.load_tree_npz(str(tmp_path / "missing.npz"))


# --- batch plan and streams -------------------------------------------------------------------------------


@pytest.mark.parametrize("total,weights,unit", [(16, [75, 1, 4], 4), (3, [1, 1], 1), (64, [1500, 27], 8),
                                                (10, [5.0], 2), (8, [0, 3, 1], 4)])
def test_split_batch_is_proportional_and_shard_aligned(total, weights, unit):
  parts = split_batch(total, weights, unit)
  assert len(parts) == len(weights) and all(p > 0 and p % unit == 0 for p in parts)
  assert sum(parts) == max(-(-total // unit), len(weights)) * unit
  extra = [p // unit - 1 for p in parts]  # beyond the one unit every part gets
  ideal = np.asarray(weights, float) / sum(weights) * sum(extra)
  assert np.all(np.abs(np.asarray(extra) - ideal) < 1.0 + 1e-9)


def test_streams_state_round_trip_on_demo_data():
  def make():
    d = data_lib.data_config()
    d.name, d.image_size = "demo_xray", 16
    p = data_lib.data_config()
    p.name, p.image_size = "demo_path", 16
    cur = Stream("current/xray", data_lib.make_train_iterator(d, global_batch_size=4, seed=1), 4, (16, 16, 3))
    buf = Stream("buffer/path", data_lib.make_train_iterator(p, global_batch_size=2, seed=2), 2, (16, 16, 3),
                 mixup=True)
    return StageStreams([cur], [buf], seed=0, stage_index=2)

  a = make()
  a.next_batch(1)
  state = a.get_state()
  want = [a.next_batch(2), a.next_batch(3)]
  b = make()
  b.set_state(state)
  got = [b.next_batch(2), b.next_batch(3)]
  for w, g in zip(want, got):
    assert [x.shape for x in g["current"]] == [(4, 16, 16, 3)] and [x.shape for x in g["buffer"]] == [(2, 16, 16, 3)]
    for x, y in zip(jax.tree.leaves(w), jax.tree.leaves(g)):
      np.testing.assert_array_equal(x, y)
  bad = StageStreams([a.current[0]], [], seed=0, stage_index=2)
  with pytest.raises(ValueError, match="differ"):
    bad.set_state(state)


# --- data-free guard --------------------------------------------------------------------------------------


def _folder_xray(tmp_path):
  """A 'folder' copy of the demo X-rays (npz), so the test may make it unreadable."""
  src = data_lib.resolve(ml_collections.ConfigDict(dict(name="demo_xray"))).path
  dst = tmp_path / "site_a"
  dst.mkdir()
  shutil.copy(src, dst / os.path.basename(src))
  d = data_lib.data_config()
  d.name, d.format, d.path, d.modality, d.image_size = "folder", "npz", str(dst / os.path.basename(src)), "xray", 16
  return d


def test_guard_refuses_retired_data_by_config_and_at_the_file_system(tmp_path):
  d = _folder_xray(tmp_path)
  g = guard.DataFreeGuard()
  with g.active():
    assert data_lib.num_examples(d) == 1500  # not retired yet
    g.retire("stage_1_xray", d)
    with pytest.raises(guard.DataFreeViolation, match="stage_1_xray"):
      g.check_config(d, what="stage 2")
    other = ml_collections.ConfigDict(d.to_dict())
    other.split = "val"  # another split of the same files is the same data
    with pytest.raises(guard.DataFreeViolation):
      g.check_config(other, what="stage 2")
    with pytest.raises(guard.DataFreeViolation, match="open"):
      np.load(d.path)
    with pytest.raises(guard.DataFreeViolation, match="stage_1_xray"):
      data_lib.num_examples(d)  # the input layer itself cannot read it either
    with pytest.raises(guard.DataFreeViolation):
      open(d.path, "rb")
    g.check_config(_demo("demo_ct"), what="stage 2")  # other data stays readable
    assert data_lib.num_examples(_demo("demo_path")) > 0
  with np.load(d.path) as f:  # outside the active block nothing is enforced
    assert len(f.files) > 0
  off = guard.DataFreeGuard(enabled=False)
  off.retire("stage_1_xray", d)
  with off.active():
    off.check_config(d, what="x")
    np.load(d.path).close()


def test_guard_covers_every_file_under_a_retired_folder(tmp_path):
  src = data_lib.resolve(_demo("demo_path")).path
  dst = tmp_path / "tiles"
  dst.mkdir()
  for f in sorted(os.listdir(src))[:6]:
    shutil.copy(os.path.join(src, f), dst / f)
  d = _demo("demo_path")
  d.name, d.format, d.path, d.modality = "folder", "images", str(dst), "path"
  g = guard.DataFreeGuard()
  with g.active():
    assert data_lib.num_examples(d) == 6
    g.retire("stage_1_path", d)
    for touch in (lambda: os.listdir(dst), lambda: open(dst / sorted(os.listdir(src))[0], "rb"),
                  lambda: list(os.scandir(dst)), lambda: data_lib.make_eval_iterator(d, batch_size=2)):
      with pytest.raises(guard.DataFreeViolation, match="stage_1_path"):
        touch()
    os.listdir(tmp_path)  # the parent folder is not the stage's data


def _demo(name):
  d = data_lib.data_config()
  d.name = name
  d.image_size, d.volume_shape = 16, (8, 16, 16)
  return d


def test_guard_rejects_stages_sharing_files(tmp_path):
  d = _folder_xray(tmp_path)
  guard.check_disjoint([("stage_1_xray", d), ("stage_2_ct", _demo("demo_ct"))])
  with pytest.raises(ValueError, match="same files"):
    guard.check_disjoint([("stage_1_xray", d), ("stage_2_xray", ml_collections.ConfigDict(d.to_dict()))])


def test_distill_scale_per_sample_weighs_buffer_samples_like_current_ones():
  from invcoss_jax.continual.config import continual_config
  from invcoss_jax.continual.sequence import distill_weight
  c = continual_config()
  c.distill_weight = 2.0
  assert distill_weight(c, [64], [16, 8]) == 2.0  # per_step: the buffer's mean weighs as the current mean
  c.distill_scale = "per_sample"
  # Per sample: the buffer's sum over its 24 samples has the current mean's 1/64 per sample.
  assert distill_weight(c, [64], [16, 8]) == pytest.approx(2.0 * 24 / 64)
  assert distill_weight(c, [64], []) == 2.0
  c.distill_scale = "other"
  with pytest.raises(ValueError, match="distill_scale"):
    distill_weight(c, [64], [8])


def test_stage_steps_set_each_stage_length_and_joint_trains_their_sum(tmp_path):
  from invcoss_jax.continual import stages
  from invcoss_jax.defaults import load_config_file
  config = load_config_file("configs/continual.py:demo")
  config.continual.order = ("xray", "ct", "path")
  config.total_steps = 7
  config.continual.method = "seqssl"
  plan = stages.plan_stages(config, tmp_path)
  assert [stages.stage_config(config, s).total_steps for s in plan] == [7, 7, 7]
  config.continual.stage_steps = (5, 0, 3)
  plan = stages.plan_stages(config, tmp_path)
  assert [stages.stage_config(config, s).total_steps for s in plan] == [5, 7, 3]
  config.continual.method = "joint"
  (joint,) = stages.plan_stages(config, tmp_path)
  assert stages.stage_config(config, joint).total_steps == 15
  config.continual.stage_steps = (5, 3)
  with pytest.raises(ValueError, match=r"stage_steps=\(5, 3\): expected one entry per stage"):
    stages.plan_stages(config, tmp_path)


def test_a_stage_recorded_with_other_training_options_is_refused_or_retrained(tmp_path):
  """The retention workdir of an earlier session held stages of 1500 steps; a 3000-step run "resumed" them."""
  from invcoss_jax.config_checks import ConfigError
  from invcoss_jax.continual import sequence as continual_job
  from invcoss_jax.continual import stages
  from invcoss_jax.defaults import load_config_file
  from invcoss_jax.train import checkpoint as ckpt_lib
  config = load_config_file("configs/continual.py:demo")
  config.continual.order = ("xray", "ct", "path")
  config.total_steps = 1500
  plan = stages.plan_stages(config, tmp_path)
  for s in plan[:2]:
    ckpt_lib.write_config(s.workdir, stages.stage_config(config, s))
  config.continual.datasets.ct.read_threads = 7  # loading knobs do not change what a stage learns
  continual_job.check_recorded_stages(config, plan)
  config.continual.stage_steps = (1500, 3000, 1500)
  with pytest.raises(ConfigError, match=r"stage_2_ct was trained with other options than this run asks for "
                                        r"\(total_steps: 1500 -> 3000\)"):
    continual_job.check_recorded_stages(config, plan)
  config.continual.stage_steps = ()
  config.train.base_lr = 1e-3
  with pytest.raises(ConfigError, match=r"stage_1_xray .*train.base_lr"):
    continual_job.check_recorded_stages(config, plan)
  config.overwrite_workdir = True  # stage 1 and everything after it are trained again
  continual_job.check_recorded_stages(config, plan)
  assert not any(os.path.exists(s.workdir) for s in plan)
