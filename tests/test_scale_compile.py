"""`config.mode = 'compile'` (invcoss_jax.jobs.compile) on a micro MAE: XLA's FLOPs against the analytic
matmul count, per-device memory and work under fsdp, FLOPs of one inversion step, the child process that
simulates more devices than the test process has, and clear errors."""

import importlib.util
import json
import math
import os

import jax
import pytest

from invcoss_jax.parallel import mesh as mesh_lib
from invcoss_jax.jobs import compile as compile_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = (32, 32, 3)


def _config():
  spec = importlib.util.spec_from_file_location("cfg_xray", os.path.join(REPO, "configs", "xray.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = compile_job.with_compile_defaults(module.get_config("demo"))  # micro ViT, 8x8 patches
  c.mode = "compile"
  c.train.global_batch_size = 16
  c.compile.pretrain_image_shape = IMAGE
  c.compile.invert_image_shape_2d = IMAGE
  c.inversion.generator = "none"  # the teacher's part of the step; InvUNet is compiled by the mesh tests
  c.inversion.schedule_2d.update(batch_size=8, init_steps=2, steps=2)
  c.inversion.pool_size = 16
  return c


def _mesh(config, n):
  return mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:n])


def test_pretrain_flops_memory_and_their_split_under_fsdp():
  c = _config()
  one = compile_job.compile_program(c, "pretrain", _mesh(c, 1))
  # XLA's count is the matmuls plus the element-wise work (norms, softmax, GELU, AdamW): a few % more.
  assert one["analytic_matmul_flops"] == compile_job.mae_train_step_flops(c.model, IMAGE, 16, 0.75)
  assert 1.0 <= one["flops_per_device"] / one["analytic_matmul_flops"] <= 1.15, one
  # The arguments are the float32 parameters, AdamW's two moments, the batch and a few scalars; the
  # donated state is aliased by the new one.
  state_bytes = 3 * 4 * one["num_params"]
  batch_bytes = 4 * 16 * math.prod(IMAGE)
  assert state_bytes + batch_bytes <= one["argument_bytes"] <= state_bytes + batch_bytes + 1024
  assert state_bytes <= one["alias_bytes"] <= state_bytes + 1024
  assert one["peak_bytes"] == one["argument_bytes"] + one["output_bytes"] + one["temp_bytes"] - one["alias_bytes"]
  assert one["fits"] and one["devices"] == 1 and one["per_device_batch"] == 16

  c.mesh.update(axes=[("fsdp", -1)], shard_params=True, fsdp_min_size=1024)
  fsdp = compile_job.compile_program(c, "pretrain", _mesh(c, 2))
  assert fsdp["mesh"] == {"fsdp": 2} and fsdp["per_device_batch"] == 8
  # Each device holds half of the large leaves (and of the batch) and does half of the work.
  assert 0.45 <= fsdp["argument_bytes"] / one["argument_bytes"] <= 0.6, (fsdp, one)
  assert 0.45 <= fsdp["flops_per_device"] / one["flops_per_device"] <= 0.6
  assert fsdp["flops_per_step_total"] == 2 * fsdp["flops_per_device"]


def test_inversion_reports_the_flops_of_one_inner_step():
  c = _config()
  mesh = _mesh(c, 1)
  short = compile_job.compile_program(c, "invert_2d", mesh)
  c.inversion.schedule_2d.init_steps = 7
  long = compile_job.compile_program(c, "invert_2d", mesh)
  assert short["steps"] == 2 and long["steps"] == 7
  # XLA counts a loop body once: the FLOPs do not grow with the number of inner steps.
  assert long["flops_per_device"] == pytest.approx(short["flops_per_device"], rel=1e-6)
  # One inner step runs the encoder on every patch and the MAE on the masked images, forward and backward
  # to the pixels: at least twice their forward matmuls.
  enc_full = compile_job.vit_mae_forward_flops(c.model, IMAGE, 0.0)
  mae = compile_job.vit_mae_forward_flops(c.model, IMAGE, float(c.inversion.task_mask_ratio))
  assert short["flops_per_device"] >= 2 * 8 * (mae + 0.5 * enc_full)
  assert short["flops_per_device"] <= 4 * 8 * (mae + enc_full)


def test_job_simulates_more_devices_in_a_child_process(tmp_path, capfd):
  c = _config()
  c.compile.num_devices = (8,)
  c.compile.programs = ("pretrain",)
  c.compile.variants = ("bf16+remat",)
  assert len(jax.devices()) < 8
  rows = compile_job.run(c, tmp_path)
  assert len(rows) == 1
  row = rows[0]
  assert row["devices"] == 8 and row["mesh"] == {"data": 8} and row["per_device_batch"] == 2
  assert row["dtype"] == "bfloat16" and row["remat"] is True and row["backend"] == "cpu"
  assert row["flops_per_device"] > 0 and row["peak_bytes"] > 0
  with open(tmp_path / compile_job.REPORT_FILE) as f:
    report = json.load(f)
  assert report["rows"] == rows
  out = capfd.readouterr().out
  assert "| pretrain | 8 | data8 | bf16 | yes | 16 (2) | 32x32x3 |" in out


@pytest.mark.parametrize("field, value, match", [
    ("programs", ("pretrain", "finetune"), "unknown program 'finetune'"),
    ("variants", ("fp8",), "unknown variant 'fp8'"),
    ("num_devices", (0,), "config.compile.num_devices"),
])
def test_bad_options_name_the_option(tmp_path, field, value, match):
  c = _config()
  c.compile.num_devices = (1,)
  c.compile[field] = value
  with pytest.raises(ValueError, match=match):
    compile_job.run(c, tmp_path)


def test_unknown_compile_field_is_an_error():
  c = _config()
  with c.compile.unlocked():
    c.compile.num_device = 8
  with pytest.raises(ValueError, match="config.compile.num_device is not an option"):
    compile_job.with_compile_defaults(c)


def test_tpu_target_without_libtpu_names_the_option(tmp_path):
  try:
    import libtpu  # noqa: F401
    pytest.skip("libtpu is installed: the deviceless TPU target would compile instead of failing")
  except ImportError:
    pass
  c = _config()
  c.compile.target = "v5p:2x2x1"
  c.compile.num_devices = (1,)
  with pytest.raises(ValueError, match=r"config.compile.target='v5p:2x2x1'.*pip install 'jax\[tpu\]'"):
    compile_job.run(c, tmp_path)
