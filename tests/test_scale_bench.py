"""benchmarks/: the PyTorch implementation computes what the JAX one computes (same weights, same masks: same MAE
loss, same four inversion terms, same generator size), and the benchmark script runs and reports consistently."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from invcoss_jax import models  # noqa: E402
from invcoss_jax.inversion import engine, losses, statistics  # noqa: E402
from invcoss_jax.inversion.config import inversion_config  # noqa: E402
from invcoss_jax.inversion.context import InversionContext  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import torch_reference as tr  # noqa: E402


def _micro():
  mc = models.model_config("micro")
  mc.patch_size_2d = (8, 8)
  mc.patch_size_3d = (8, 8, 8)
  return mc


@pytest.fixture(scope="module")
def xrays():
  from invcoss_jax import data as data_lib
  from invcoss_jax.data.config import data_config
  d = data_config()
  d.name = "demo_xray"
  d.image_size = 32
  return np.asarray(next(data_lib.make_eval_iterator(d, batch_size=8))["image"], np.float32)


@pytest.mark.parametrize("shape", [(32, 32, 3), (16, 32, 32, 1)])
def test_torch_mae_equals_the_jax_mae(shape, xrays):
  mc = _micro()
  model = models.build_mae(mc)
  params = jax.jit(lambda k: models.init_mae_params(model, k, [shape]))(jax.random.PRNGKey(0))
  net = tr.MAE(models.ViTConfig.from_config(mc), shape)
  tr.load_flax_params(net, params)
  rng = np.random.default_rng(0)
  x = xrays[:4] if len(shape) == 3 else rng.uniform(-1, 1, size=(4, *shape)).astype(np.float32)
  noise = rng.uniform(size=(4, int(np.prod(net.grid)))).astype(np.float32)
  out = jax.jit(lambda p, x, n: model.apply({"params": p}, x, mask_ratio=0.75, noise=n))(
      params, jnp.asarray(x), jnp.asarray(noise))
  with torch.no_grad():
    loss, pred, target, mask = net(tr.to_channels_first(x), torch.from_numpy(noise), 0.75)
  np.testing.assert_array_equal(mask.numpy(), np.asarray(out["mask"]))
  np.testing.assert_allclose(pred.numpy(), np.asarray(out["pred"]), atol=2e-5)
  np.testing.assert_allclose(target.numpy(), np.asarray(out["target"]), atol=2e-5)
  assert float(loss) == pytest.approx(float(out["loss"]), rel=1e-5)


def test_torch_inversion_terms_equal_the_jax_terms(xrays):
  mc = _micro()
  shape = (32, 32, 3)
  model = models.build_mae(mc)
  params = jax.jit(lambda k: models.init_mae_params(model, k, [shape]))(jax.random.PRNGKey(1))
  stats = statistics.compute_statistics(model, params, [xrays])
  inv = inversion_config()
  # A "synthetic" batch: real images with a smooth perturbation (so the statistics do not match exactly).
  images = np.clip(xrays[:4] * 0.8 + 0.1, 0, 1).astype(np.float32)
  feats = np.random.default_rng(0).normal(size=(6, mc.width)).astype(np.float32)
  target = statistics.FeatureStats(count=jnp.float32(stats.count), mean=jnp.asarray(stats.mean, jnp.float32),
                                   var=jnp.asarray(stats.var, jnp.float32))
  noise = np.random.default_rng(1).uniform(size=(4, 16)).astype(np.float32)

  @jax.jit
  def jax_terms(params, images, pool, noise):
    # The engine's context (statistics, features, the pool with the batch in it), with the task's mask fixed.
    ctx = InversionContext(images=images, model=model, params=params, target_stats=target, rng=jax.random.key(0),
                           pool=pool, pool_count=jnp.int32(2), spec=inv)
    out = model.apply({"params": params}, images, mask_ratio=0.75, noise=noise)
    return dict(norm=losses.norm_term(ctx, inv), task=losses.l_task(out["pred"], out["target"], out["mask"]),
                img=losses.img_term(ctx, inv), rep=losses.rep_term(ctx, inv))

  want = jax_terms(params, jnp.asarray(images), jnp.asarray(feats), jnp.asarray(noise))

  net = tr.MAE(models.ViTConfig.from_config(mc), shape)
  tr.load_flax_params(net, params)
  with torch.no_grad():
    got = tr.inversion_losses(net, tr.to_channels_first(images), torch.from_numpy(np.asarray(stats.mean, np.float32)),
                              torch.from_numpy(np.asarray(stats.var, np.float32)), torch.from_numpy(feats), 2,
                              torch.from_numpy(noise), inv)
  assert set(got) == set(losses.active_terms(inv))
  for name, value in want.items():
    assert float(got[name]) == pytest.approx(float(value), rel=2e-4, abs=1e-6), name
  assert all(float(v) > 0 for v in got.values())


def test_torch_bf16_step_matches_the_jax_bf16_model(xrays):
  # `bench.py --dtype=bfloat16` compares like with like: PyTorch's step under autocast computes in bf16 what the
  # JAX model with dtype=bfloat16 computes (float32 parameters in both), and differs from its own float32 loss.
  from invcoss_jax.train.config import train_config
  shape = (32, 32, 3)
  mc = _micro()
  mc.dtype = "bfloat16"
  model = models.build_mae(mc)
  params = jax.jit(lambda k: models.init_mae_params(model, k, [shape]))(jax.random.PRNGKey(0))
  noise = np.random.default_rng(0).uniform(size=(8, 16)).astype(np.float32)
  want = float(jax.jit(lambda p, x, n: model.apply({"params": p}, x, mask_ratio=0.75, noise=n)["loss"])(
      params, jnp.asarray(xrays), jnp.asarray(noise)))
  tcfg = train_config()
  tcfg.global_batch_size = 8
  losses_by_dtype = {}
  for dtype in (torch.float32, torch.bfloat16):
    net = tr.MAE(models.ViTConfig.from_config(mc), shape)
    tr.load_flax_params(net, params)
    step = tr.make_pretrain_step(net, tcfg, 0.75, dtype)
    losses_by_dtype[dtype] = step(tr.to_channels_first(xrays), torch.from_numpy(noise))
  f32, bf16 = losses_by_dtype[torch.float32], losses_by_dtype[torch.bfloat16]
  assert bf16 != f32
  assert bf16 == pytest.approx(want, abs=2e-3)  # measured: 3e-4 apart (f32: 8e-5)


@pytest.mark.parametrize("shape, latent", [((64, 64, 3), 128), ((16, 32, 32, 1), 512)])
def test_torch_invunet_has_the_jax_generators_size(shape, latent):
  inv = inversion_config()
  gen = engine.build_generator(inv, shape)
  opt_vars, state = jax.eval_shape(lambda k: engine.init_variables(gen, shape, 2, latent, k), jax.random.PRNGKey(0))
  n_jax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(opt_vars["generator"]))
  net = tr.InvUNet(shape, latent, tuple(inv.invunet.channels), inv.invunet.activation,
                   engine.output_activation(inv, len(shape) - 1))
  assert sum(p.numel() for p in net.parameters()) == n_jax
  y = net(torch.randn(2, latent))
  assert tuple(y.shape) == (2, shape[-1], *shape[:-1])


@pytest.mark.benchmark  # runs the benchmark script itself: `pytest -m benchmark`
def test_benchmark_script_reports_both_implementations(tmp_path):
  import bench  # benchmarks/ is on sys.path (above)
  out = tmp_path / "bench.json"
  result = bench.main(["--models=micro", "--dims=2d", "--programs=pretrain,invert", "--image_size=32",
                       "--batch_pretrain_2d=8", "--batch_invert_2d=4", "--invunet_channels=8,16,32",
                       "--pool_size=8", "--steps=2", "--rounds=2", "--warmup=1", "--matmul_size=256", "--torch",
                       "--breakdown", f"--out={out}"])
  with open(out) as f:
    saved = json.load(f)
  assert saved["rows"] == json.loads(json.dumps(result["rows"]))
  assert saved["conditions"]["cpu_count"] == os.cpu_count() and len(saved["conditions"]["loadavg_end"]) == 3
  assert len(saved["matmul_peak_flops"]["jax"]) == len(saved["matmul_peak_flops"]["torch"]) == 2
  pre, inv = saved["rows"]
  assert (pre["program"], inv["program"]) == ("pretrain", "invert")
  # The pre-training step's FLOPs are XLA's count for the micro MAE at batch 8: 3x the forward matmuls plus the
  # element-wise work, which at 4 patches per image (AdamW over 0.2 M parameters included) is up to half again.
  from invcoss_jax.models.flops import mae_train_step_flops
  analytic = mae_train_step_flops(bench.model_config("micro", "float32", False, 16), (32, 32, 3), 8, 0.75)
  assert 1.0 <= pre["flops_per_step"] / analytic <= 1.6
  # The breakdown's products are exactly the analytic matmul count, and each part took time.
  parts = pre["matmul_breakdown"]
  assert parts["dense_flops"] + parts["attention_flops"] == analytic
  assert parts["dense"] > 0 and parts["attention"] > 0 and inv["matmul_breakdown"] == {}
  for row in (pre, inv):
    assert len(row["jax_step_s"]) == len(row["torch_step_s"]) == 2
    assert row["jax_images_per_s"] == pytest.approx(row["batch"] / np.median(row["jax_step_s"]))
    assert row["speedup"] == pytest.approx(np.median(row["torch_step_s"]) / np.median(row["jax_step_s"]))
    # MFU against the highest peak of the session: the start's and each round's.
    assert len(row["round_peak_flops"]) == 2
    assert row["mfu_peak_flops"] == max(saved["matmul_peak_flops"]["jax"] + row["round_peak_flops"])
    assert row["jax_mfu"] == pytest.approx(row["flops_per_step"] / np.median(row["jax_step_s"]) /
                                           row["mfu_peak_flops"])
    assert row["torch_mfu"] == pytest.approx(row["flops_per_step"] / np.median(row["torch_step_s"]) /
                                             row["mfu_peak_flops"])
    assert row["jax_mfu"] > 0 and row["compile_s"] > 0 and row["memory_bytes"] > 0


def test_kernel_benchmark_cases_compute_what_they_name():
  # The micro-benchmark's variants are timed as equivalents: the depth-sum convolution must be the 3D one, and each
  # product must be the named matrix product of the operands.
  import xla_cpu_kernels as kb
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 7, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 4)), jnp.float32)
  np.testing.assert_allclose(kb.conv3d_as_depth_sum(x, k), kb.conv3d_native(x, k), atol=1e-4)
  xm, w, g = (rng.normal(size=s).astype(np.float32) for s in ((6, 4), (4, 5), (6, 5)))
  want = {"x @ w": xm @ w, "g @ w.T": g @ w.T, "x.T @ g": xm.T @ g}
  for name, (fn, dtype) in kb.product_cases().items():
    got = np.asarray(fn(*(jnp.asarray(a).astype(dtype) for a in (xm, w, g))), np.float32)
    np.testing.assert_allclose(got, want[name.split(",")[0]], rtol=5e-2 if dtype == "bfloat16" else 1e-5,
                               atol=5e-2 if dtype == "bfloat16" else 1e-5, err_msg=name)
