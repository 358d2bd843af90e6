"""The pre-training job on the embedded demo X-rays: loss falls, device-count invariance (data
parallel and fsdp), exact resume, bf16/remat, reconstructions, workdir contents,
load_trained_stage, clear errors."""

import glob
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invcoss_jax.defaults import load_config_file
from invcoss_jax import jobs, models
from invcoss_jax.train import checkpoint as ckpt_lib
from invcoss_jax.train import optim, writers
from invcoss_jax.jobs.pretrain import pretrain
from invcoss_jax.train.pretrain import make_reconstruct

TOTAL = 24


def load_config(name: str, arg=None):
  return load_config_file(f"configs/{name}.py" + (f":{arg}" if arg else ""))


def demo_config(images: bool = False, **mesh):
  c = load_config("xray", "demo")
  c.total_steps = TOTAL
  c.train.stats_after_pretrain = False  # the statistics job has its own tests
  c.checkpoint.every_steps = 8
  c.checkpoint.max_to_keep = 2
  c.logging.log_every_steps = 4
  c.logging.image_every_steps = 12 if images else 0
  c.mesh.update(mesh)
  return c


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted data-parallel run on the 4 simulated devices."""
  workdir = tmp_path_factory.mktemp("reference")
  config = demo_config(images=True)
  return config, str(workdir), pretrain(config, workdir)


def _losses(result, steps):
  return np.array([result["losses"][s] for s in steps])


def test_loss_falls_on_demo_xrays(reference):
  _, _, result = reference
  losses = _losses(result, range(1, TOTAL + 1))
  assert np.all(np.isfinite(losses))
  assert losses[-6:].mean() < 0.85 * losses[:6].mean(), losses
  assert result["step"] == result["total_steps"] == TOTAL
  assert result["final_loss"] == losses[-1]


def test_same_losses_on_one_device_and_with_fsdp(reference, tmp_path):
  """Steps 1-6 on one device, then resumed on a 2x2 (data, fsdp) mesh with sharded parameters:
  the same losses as the 4-device data-parallel reference, and a restore into another layout."""
  _, _, ref = reference
  workdir = tmp_path / "elastic"
  one = pretrain(demo_config(num_devices=1), workdir, stop_at_step=6)
  np.testing.assert_allclose(_losses(one, range(1, 7)), _losses(ref, range(1, 7)), rtol=2e-5, atol=2e-6)
  fsdp = pretrain(demo_config(axes=[("data", 2), ("fsdp", 2)], shard_params=True, fsdp_min_size=1024),
                  workdir, stop_at_step=12)
  assert sorted(fsdp["losses"]) == list(range(7, 13))
  np.testing.assert_allclose(_losses(fsdp, range(7, 13)), _losses(ref, range(7, 13)), rtol=2e-5, atol=2e-6)
  # Parameters really were split over 'fsdp' (both data-parallel rows hold the same halves).
  kernel = fsdp["state"].params["encoder"]["block_0"]["fc1"]["kernel"]
  assert "fsdp" in str(kernel.sharding.spec)
  assert {s.data.shape for s in kernel.addressable_shards} == {(kernel.shape[0], kernel.shape[1] // 2)}


def test_resume_gives_the_same_later_losses(reference, tmp_path):
  _, _, ref = reference
  workdir = tmp_path / "resumed"
  first = pretrain(demo_config(), workdir, stop_at_step=10)  # 10 is not a save step: forced save
  assert max(first["losses"]) == 10 and first["step"] == 10 and first["stats"] is None
  second = pretrain(demo_config(), workdir)
  assert min(second["losses"]) == 11 and second["step"] == TOTAL
  later = range(11, TOTAL + 1)
  np.testing.assert_allclose(_losses(second, later), _losses(ref, later), rtol=1e-6, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
               second["state"].params, ref["state"].params)


def test_four_steps_per_dispatch_stopped_and_resumed_give_the_same_losses(reference, tmp_path):
  """Blocks of 4 steps per dispatch on the 4 simulated devices (the block's batches split over 'data'), with the
  image-grid hook at step 12 and a stop at 10: the reference's losses and parameters."""
  _, _, ref = reference
  config = demo_config(images=True)
  config.train.steps_per_dispatch = 4
  first = pretrain(config, tmp_path, stop_at_step=10)
  second = pretrain(config, tmp_path)
  assert sorted(first["losses"]) == list(range(1, 11)) and sorted(second["losses"]) == list(range(11, TOTAL + 1))
  losses = {**first["losses"], **second["losses"]}
  np.testing.assert_allclose(_losses({"losses": losses}, range(1, TOTAL + 1)), _losses(ref, range(1, TOTAL + 1)),
                             rtol=1e-6, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
               second["state"].params, ref["state"].params)


def test_bf16_compute_with_remat_keeps_float32_params_and_loss(reference, tmp_path):
  _, _, ref = reference
  config = demo_config()
  config.model.dtype = "bfloat16"
  config.model.remat = True
  out = pretrain(config, tmp_path / "bf16", stop_at_step=2)
  state = out["state"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  # Same initial parameters, data and masks: bf16 only perturbs the arithmetic (and rematerialised
  # blocks the backward pass), so the float32 loss stays close to the float32 run's.
  for s in (1, 2):
    assert out["losses"][s] == pytest.approx(ref["losses"][s], rel=3e-2)
  assert out["losses"][1] != ref["losses"][1]


def test_reconstructions(reference):
  config, _, ref = reference
  model = models.build_mae(config.model)
  from invcoss_jax import data as data_lib
  images = np.asarray(next(data_lib.make_train_iterator(config.data, global_batch_size=3, seed=1))["image"])
  mask_px, recon = jax.device_get(make_reconstruct(model, 0.75)(ref["state"].params, jnp.asarray(images),
                                                                jax.random.PRNGKey(1)))
  assert mask_px.shape == recon.shape == images.shape == (3, 32, 32, 3)
  # 12 of 16 patches masked, differently per image; visible pixels are the input's own, masked
  # ones predicted.
  np.testing.assert_allclose(mask_px.mean(axis=(1, 2, 3)), 0.75)
  assert not np.array_equal(mask_px[0], mask_px[1])
  visible = mask_px == 0
  np.testing.assert_allclose(recon[visible], images[visible], atol=1e-5)
  assert np.abs(recon[~visible] - images[~visible]).max() > 1e-3
  grid = writers.mae_image_grid(images, mask_px, recon)
  assert grid.shape == (3 * (32 + 2) + 2, 3 * (32 + 2) + 2, 3) and grid.dtype == np.float32
  assert 0.0 <= grid.min() and grid.max() <= 1.0
  x = images[0]  # first panel of row 0: the input scaled to [0, 1] by its own range
  np.testing.assert_allclose(grid[2:34, 2:34], (x - x.min()) / (x.max() - x.min()), atol=1e-6)


def test_workdir_holds_config_checkpoints_and_events(reference):
  config, workdir, result = reference
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved == ckpt_lib.config_to_dict(config)
  assert saved["total_steps"] == TOTAL and saved["model"]["preset"] == "micro"
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [16, 24]  # every 8 steps, max_to_keep=2

  from tensorboard.backend.event_processing import event_accumulator
  files = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert files, os.listdir(workdir)
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  tags = set(acc.Tags()["tensors"])
  assert {"train/loss", "train/learning_rate", "train/steps_per_sec", "train/reconstruction"} <= tags, tags
  scalar = lambda tag: {e.step: float(jax.numpy.asarray(
      __import__("tensorflow").make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)}
  loss = scalar("train/loss")
  assert sorted(loss) == [1, 4, 8, 12, 16, 20, 24]
  assert loss[8] == pytest.approx(np.mean([result["losses"][s] for s in (5, 6, 7, 8)]), rel=1e-6)
  sched = optim.make_schedule(config.train, optim.run_length(config, None))
  for step, lr in scalar("train/learning_rate").items():
    assert lr == pytest.approx(float(sched(step - 1)), rel=1e-6, abs=1e-12)
  assert all(v > 0 for v in scalar("train/steps_per_sec").values())
  images = acc.Tensors("train/reconstruction")
  assert [e.step for e in images] == [12, 24]


def test_load_trained_stage(reference, caplog):
  config, workdir, result = reference
  with caplog.at_level(logging.WARNING):
    cfg, model, params = ckpt_lib.load_trained_stage(workdir)
  # Only the parameters are read, without orbax's "Item data_iter was found ... could not be restored".
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert isinstance(model, models.MAE) and cfg.to_dict() == ckpt_lib.config_to_dict(config)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, result["state"].params)
  assert model.cfg.patch_size_2d == (8, 8) and model.cfg.width == config.model.width
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_load_trained_stage_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not the workdir of a trained stage") as e:
    ckpt_lib.load_trained_stage(tmp_path / "nowhere")
  assert "nowhere" in str(e.value)
  ckpt_lib.write_config(tmp_path, demo_config())
  with pytest.raises(FileNotFoundError, match="has no checkpoints"):
    ckpt_lib.load_trained_stage(tmp_path)


def test_missing_data_names_the_path_and_the_demo_preset(tmp_path):
  config = load_config("xray")  # the paper config: MIMIC-CXR under ./data, absent here
  config.data.path = str(tmp_path / "mimic_cxr_jpg")
  with pytest.raises(FileNotFoundError) as e:
    pretrain(config, tmp_path / "workdir")
  msg = str(e.value)
  assert str(tmp_path / "mimic_cxr_jpg") in msg and "configs/xray.py:demo" in msg


def test_unknown_mode_lists_the_modes(tmp_path):
  config = demo_config()
  config.mode = "pretrian"
  with pytest.raises(ValueError, match="config.mode='pretrian'") as e:
    jobs.run(config, tmp_path)
  assert "pretrain" in str(e.value) and "continual" in str(e.value)


def test_non_finite_loss_stops_at_its_first_step_and_keeps_the_last_finite_checkpoint(tmp_path):
  config = load_config_file("configs/xray.py:demo")
  config.total_steps, config.checkpoint.every_steps, config.logging.log_every_steps = 8, 2, 100
  config.train.base_lr = 1e35  # finite through the first steps of warm-up, then the loss overflows
  with pytest.raises(FloatingPointError, match=r"pretrain: non-finite training loss at step (\d+); the last "
                                               r"checkpoint \(step (\d+)\) is kept") as e:
    jobs.run(config, tmp_path)
  import re
  bad, kept = (int(x) for x in re.search(r"step (\d+); .*step (\d+)", str(e.value)).groups())
  assert kept == 2 * ((bad - 1) // 2)  # the last checkpoint (every 2 steps) before the first bad step
  assert ckpt_lib.make_manager(tmp_path, read_only=True).latest_step() == kept
  params = ckpt_lib.load_trained_stage(tmp_path)[2]
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_check_losses_names_the_first_non_finite_step():
  from invcoss_jax.train.nonfinite import check_losses
  ok = [(5, {"loss": np.float32(1.0)}), (6, {"loss": np.float32(2.0)})]
  check_losses(ok, what="stage_2_ct", latest_checkpoint=4)
  bad = ok + [(7, {"loss": np.float32(np.inf)}), (8, {"loss": np.float32(np.nan)})]
  with pytest.raises(FloatingPointError, match=r"stage_2_ct: non-finite training loss at step 7; the last "
                                               r"checkpoint \(step 4\) is kept"):
    check_losses(bad, what="stage_2_ct", latest_checkpoint=4)
  with pytest.raises(FloatingPointError, match="no checkpoint was written"):
    check_losses(bad, what="pretrain", latest_checkpoint=None)
