"""The mesh and shardings every job uses (4 simulated CPU devices from conftest)."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.parallel.config import mesh_config


def _cfg(axes, **kw):
  c = mesh_config()
  c.axes = axes
  c.update(kw)
  return c


def test_four_simulated_devices():
  assert len(jax.devices()) == 4, "conftest should give 4 simulated CPU devices"


def test_default_mesh_is_data_parallel_over_all_devices_with_auto_axes():
  mesh = mesh_lib.make_mesh(mesh_config())
  assert dict(mesh.shape) == {"data": 4}
  assert mesh.axis_types == (AxisType.Auto,)
  assert mesh_lib.data_sharding(mesh).spec == P(("data",))


def test_minus_one_takes_the_remaining_devices_and_num_devices_limits_them():
  mesh = mesh_lib.make_mesh(_cfg([("data", -1), ("fsdp", 2)]))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert mesh_lib.data_sharding(mesh).spec == P(("data", "fsdp"))
  assert mesh_lib.num_batch_shards(mesh) == 4
  one = mesh_lib.make_mesh(_cfg([("data", -1)], num_devices=1))
  assert dict(one.shape) == {"data": 1} and one.devices.flat[0] == jax.devices()[0]
  two = mesh_lib.make_mesh(_cfg([("data", -1)]), devices=jax.devices()[2:])
  assert [d.id for d in two.devices.flat] == [d.id for d in jax.devices()[2:]]


@pytest.mark.parametrize("axes, match", [
    ([("data", 3)], "divide the 4"),
    ([("data", -1), ("fsdp", -1)], "at most one axis"),
    ([("data", 2)], "gives 2 devices but 4"),
    ([("data", 0)], "positive"),
    (["data"], r"\(name, size\) pairs"),
    ([("data", 2), ("data", 2)], "unique"),
])
def test_bad_mesh_configs_name_the_option(axes, match):
  with pytest.raises(ValueError, match=match) as e:
    mesh_lib.make_mesh(_cfg(axes))
  assert "config.mesh.axes" in str(e.value)


def test_too_many_devices_requested():
  with pytest.raises(ValueError, match="config.mesh.num_devices=8"):
    mesh_lib.make_mesh(_cfg([("data", -1)], num_devices=8))


def _tree():
  return {"kernel": jax.ShapeDtypeStruct((64, 96), np.float32),  # 96 > 64, both divisible by 2
          "odd": jax.ShapeDtypeStruct((63, 65), np.float32),  # no dim divisible by 2
          "bias": jax.ShapeDtypeStruct((96,), np.float32),  # below min_size
          "embed": jax.ShapeDtypeStruct((1, 5, 64), np.float32)}


def test_fsdp_shards_the_largest_divisible_dim_of_large_leaves():
  mesh = mesh_lib.make_mesh(_cfg([("data", -1), ("fsdp", 2)]))
  specs = jax.tree.map(lambda s: s.spec, mesh_lib.state_shardings(_tree(), mesh, mesh_lib.LayoutRules(True, 256)))
  assert specs == {"kernel": P(None, "fsdp"), "odd": P(), "bias": P(), "embed": P(None, None, "fsdp")}
  # Off, or without an fsdp axis, everything is replicated.
  off = mesh_lib.state_shardings(_tree(), mesh, mesh_lib.LayoutRules(False, 256))
  assert all(s.spec == P() for s in jax.tree.leaves(off))
  dp = mesh_lib.make_mesh(mesh_config())
  assert all(s.spec == P() for s in jax.tree.leaves(mesh_lib.state_shardings(_tree(), dp, mesh_lib.LayoutRules(True, 1))))


def test_sharding_rules_lay_out_named_trees_on_their_own():
  mesh = mesh_lib.make_mesh(_cfg([("data", -1), ("fsdp", 2)]))
  c = mesh_config()
  c.shard_params, c.fsdp_min_size = True, 256
  c.sharding_rules = (("teacher/.*", "replicated"), (".*/embed", "fsdp"))
  consts = {"teacher": _tree(), "trainable": _tree()}
  specs = jax.tree.map(lambda s: s.spec, mesh_lib.state_shardings(consts, mesh, c))
  assert all(v == P() for v in specs["teacher"].values())  # 'teacher/embed' too: the first matching rule wins
  assert specs["trainable"] == {"kernel": P(None, "fsdp"), "odd": P(), "bias": P(), "embed": P(None, None, "fsdp")}
  # Rules also shard what the default keeps whole, and name a tree by prefix.
  c.shard_params, c.sharding_rules = False, (("generator/kernel", "fsdp"),)
  specs = jax.tree.map(lambda s: s.spec, mesh_lib.state_shardings(_tree(), mesh, c, prefix="generator"))
  assert specs == {"kernel": P(None, "fsdp"), "odd": P(), "bias": P(), "embed": P()}
  for bad, match in (((("x", "sharded"),), "layout one of"), ((("(", "fsdp"),), "not a regular expression")):
    c.sharding_rules = bad
    with pytest.raises(ValueError, match=match):
      mesh_lib.state_shardings(_tree(), mesh, c)


def test_sharded_parameters_hold_the_right_pieces():
  mesh = mesh_lib.make_mesh(_cfg([("data", 1), ("fsdp", 4)]))
  x = np.arange(64 * 96, dtype=np.float32).reshape(64, 96)
  sharding = mesh_lib.state_shardings({"k": x}, mesh, mesh_lib.LayoutRules(True, 1))["k"]
  arr = jax.device_put(x, sharding)
  assert {s.data.shape for s in arr.addressable_shards} == {(64, 24)}
  for s in arr.addressable_shards:
    np.testing.assert_array_equal(np.asarray(s.data), x[s.index])
  np.testing.assert_array_equal(np.asarray(arr), x)


def test_put_batch_makes_a_global_array_split_over_the_batch_axes():
  mesh = mesh_lib.make_mesh(_cfg([("data", 2), ("fsdp", 2)]))
  images = np.random.default_rng(0).normal(size=(8, 4, 4, 3)).astype(np.float32)
  labels = np.arange(8, dtype=np.int32)
  out = mesh_lib.put_batch(mesh, {"image": images, "label": labels})
  assert out["image"].shape == (8, 4, 4, 3) and out["image"].dtype == np.float32
  assert out["label"].dtype == np.int32
  assert out["image"].sharding.spec == P(("data", "fsdp"))
  assert len({tuple(d.id for d in s.data.devices()) for s in out["image"].addressable_shards}) == 4
  for s in out["image"].addressable_shards:
    assert s.data.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(np.asarray(s.data), images[s.index])
  np.testing.assert_array_equal(np.asarray(out["label"]), labels)


def test_batches_that_do_not_split_raise():
  mesh = mesh_lib.make_mesh(mesh_config())
  with pytest.raises(ValueError, match="cannot be split over the 4 batch shards"):
    mesh_lib.put_batch(mesh, {"image": np.zeros((6, 2), np.float32)})
  with pytest.raises(ValueError, match="config.train.global_batch_size=6"):
    mesh_lib.check_global_batch(mesh, 6)
  mesh_lib.check_global_batch(mesh, 8)


def test_mesh_config_from_json_lists():
  # config.json turns tuples into lists; a config read back must build the same mesh.
  c = ml_collections.ConfigDict({"axes": [["data", -1], ["fsdp", 2]], "shard_params": True})
  assert dict(mesh_lib.make_mesh(c).shape) == {"data": 2, "fsdp": 2}
