"""The jitted train step on real demo X-rays: gradient accumulation and donation; the image grid.
(bf16/remat and the reconstructions are checked against the reference run in test_train_pretrain.)"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from invcoss_jax import models
from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.parallel.config import mesh_config
from invcoss_jax.train import optim, writers
from invcoss_jax.train.config import train_config
from invcoss_jax.train.core import jit_step as jit_train_step
from invcoss_jax.train.pretrain import make_train_step
from invcoss_jax.train.core import create_train_state

IMAGE = (32, 32, 3)


@pytest.fixture(scope="module")
def xray_batch():
  from invcoss_jax import data as data_lib
  from invcoss_jax.data.config import data_config
  d = data_config()
  d.name = "demo_xray"
  d.image_size = IMAGE[0]
  images = np.asarray(next(data_lib.make_train_iterator(d, global_batch_size=8, seed=0))["image"])
  assert images.shape == (8, *IMAGE) and images.dtype == np.float32
  return {"image": images}


def _model_cfg(**kw):
  mc = models.model_config("micro")
  mc.patch_size_2d = (8, 8)
  mc.update(kw)
  return mc


def _setup(model_cfg, grad_accum_steps=1, num_devices=4, **train):
  config = ml_collections.ConfigDict(dict(total_steps=10, train=train_config()))
  config.train.update(global_batch_size=8, base_lr=0.05, grad_accum_steps=grad_accum_steps, **train)
  length = optim.run_length(config, None)
  tx, sched = optim.make_optimizer(config.train, length)
  model = models.build_mae(model_cfg)
  mc = mesh_config()
  mc.num_devices = num_devices
  mesh = mesh_lib.make_mesh(mc)
  with jax.set_mesh(mesh):
    state, shardings = create_train_state(lambda r: models.init_mae_params(model, r, [IMAGE]), tx,
                                          jax.random.PRNGKey(0), mesh)
  step = jit_train_step(make_train_step(model, tx, sched, mask_ratio=0.75,
                                        grad_accum_steps=grad_accum_steps), shardings, mesh)
  return model, mesh, state, step


def test_accumulation_updates_every_k_steps_and_old_state_is_donated(xray_batch):
  _, mesh, state, step = _setup(_model_cfg(), grad_accum_steps=2, warmup_epochs=0)
  batch = mesh_lib.put_batch(mesh, {"image": xray_batch["image"][:4]})  # micro-batch 8 / 2
  before = jax.device_get(state.params)
  old = state
  with jax.set_mesh(mesh):
    state, m1 = step(state, batch)
    # The old state was donated to the new one. (Parameters fetched to the host above stay alive:
    # a zero-copy NumPy view blocks their donation, so check what was not fetched.)
    assert old.step.is_deleted() and all(x.is_deleted() for x in jax.tree.leaves(old.opt_state))
    mid = jax.device_get(state.params)
    state, m2 = step(state, batch)
    state, m3 = step(state, batch)
  jax.tree.map(np.testing.assert_array_equal, mid, before)  # nothing applied after 1 of 2
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, before)
  assert all(jax.tree.leaves(changed))
  assert int(state.step) == 3 and int(state.opt_state.gradient_step) == 1
  # The logged lr is the one of the update the micro-batch belongs to.
  assert float(m1["learning_rate"]) == float(m2["learning_rate"]) > float(m3["learning_rate"]) > 0


def test_grid_shows_the_middle_slice_of_volumes():
  rng = np.random.default_rng(0)
  vol = rng.normal(size=(2, 4, 8, 8, 1)).astype(np.float32)
  mask = np.zeros_like(vol)
  grid = writers.mae_image_grid(vol, mask, vol)
  assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)
  mid = vol[0, 2, :, :, 0]
  want = (mid - vol[0, 2].min()) / (vol[0, 2].max() - vol[0, 2].min())
  for c in range(3):
    np.testing.assert_allclose(grid[2:10, 2:10, c], want, atol=1e-6)
    np.testing.assert_allclose(grid[2:10, 22:30, c], want, atol=1e-6)  # nothing masked: recon = input
  with pytest.raises(ValueError, match="expected"):
    writers.mid_slice(np.zeros((2, 3)))
