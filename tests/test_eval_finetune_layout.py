"""Fine-tuning lays out its state by config.mesh as pre-training does (issue 23): `shard_params` splits the large
leaves over 'fsdp' and `sharding_rules` override leaf by leaf, on 4 simulated CPU devices (conftest)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from invcoss_jax.defaults import load_config_file
from invcoss_jax.evaluate import finetune
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.parallel.config import mesh_config


def _task_and_model():
  c = load_config_file("configs/evaluate.py:pneumonia")
  c.model.width, c.model.depth, c.model.num_heads = 64, 1, 4
  t = c.evaluate.tasks.pneumonia
  t.data.image_size = 32
  t.data.augment = False
  t.steps, t.eval_every, t.lr = 2, 2, 1e-3
  t.batch_size, t.eval_batch_size = 8, 64
  return t, c.model


def _names(tree):
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.skipif(jax.device_count() < 4, reason="needs the 4 simulated CPU devices of conftest")
def test_finetuning_honours_shard_params_and_sharding_rules():
  task, model_cfg = _task_and_model()
  mcfg = mesh_config()
  mcfg.axes = [("data", 1), ("fsdp", 4)]
  mcfg.shard_params, mcfg.fsdp_min_size = True, 1024
  # The classifier head stays whole although shard_params would split it; everything else large is split.
  mcfg.sharding_rules = (("(params|opt_state)/.*head.*", "replicated"),)
  ft = finetune.Finetuner(task, "pneumonia", model_cfg, mesh_cfg=mcfg)
  specs = {k: s.spec for k, s in _names(ft.shardings.params).items()}
  split = {k for k, s in specs.items() if "fsdp" in tuple(s)}
  heads = {k for k in specs if "head" in k}
  assert heads and all(specs[k] == P() for k in heads), specs
  # The encoder's large kernels (patch embedding, attention, MLP) are split over the 4 devices.
  assert any("encoder" in k and k.endswith("kernel") for k in split), specs
  assert not split & heads
  # The optimiser's moments follow their parameters (named opt_state/...), and the state really lives there.
  opt = {k: s.spec for k, s in _names(ft.shardings.opt_state).items()}
  assert any("fsdp" in tuple(s) for s in opt.values())
  assert all(s == P() for k, s in opt.items() if "head" in k)
  result = ft.run(seed=0, keep_params=True)
  leaves = _names(result.params)
  for k in split:
    assert {sh.data.shape for sh in leaves[k].addressable_shards} != {leaves[k].shape}, k
  assert np.isfinite(result.history[-1]["train_loss"])

  # Without the rules and shard_params (the default config.mesh) the same model stays replicated.
  plain = mesh_config()
  plain.axes = [("data", 1), ("fsdp", 4)]
  ft = finetune.Finetuner(task, "pneumonia", model_cfg, mesh_cfg=plain)
  assert all(s.spec == P() for s in jax.tree.leaves(ft.shardings))
  assert mesh_lib.LayoutRules.of(plain) == mesh_lib.LayoutRules()
