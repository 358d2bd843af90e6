"""InvUNet (App. B.3, Table 4) and the CMI bottom-to-top baseline: shapes, ranges, resolutions, sizes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from invcoss_jax.models.cmi_generator import CMIGenerator
from invcoss_jax.models.invunet import InvUNet

SMALL = (4, 8, 16, 32, 64)
# XLA's RngBitGenerator keys: initialisers compile ~4x faster than with threefry on CPU.
RBG0 = jax.random.key(0, impl="rbg")


def abstract_init(module, latent_dim, batch=2):
  """Parameter/state shapes and sown feature maps, computed with eval_shape (nothing big is allocated)."""
  z = jax.ShapeDtypeStruct((batch, latent_dim), jnp.float32)
  variables = jax.eval_shape(lambda z: module.init(jax.random.key(0), z, train=True), z)
  out, state = jax.eval_shape(lambda v, z: module.apply(v, z, train=True, mutable=["batch_stats", "intermediates"]),
                              variables, z)
  return variables, out, state


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def table4_rows(state):
  inter = state["intermediates"]
  return {k: (tuple(v[0].shape[1:-1]), v[0].shape[-1]) for k, v in inter.items()}


def test_table4_2d_resolutions_and_parameter_count():
  variables, out, state = abstract_init(InvUNet(image_shape=(224, 224, 3)), 128)
  assert out.shape == (2, 224, 224, 3) and out.dtype == jnp.float32
  rows = table4_rows(state)
  assert rows["bottleneck"] == ((14, 14), 256)
  for k, (res, ch) in enumerate([(28, 128), (56, 64), (112, 32), (224, 16)], start=1):
    assert rows[f"MC-{k}"] == ((res, res), ch)
    assert rows[f"Inv-{k}"] == ((res, res), ch)
  assert "batch_stats" in variables  # BatchNorm in 2D
  per_layer = {k[0]: 0 for k in flatten_dict(variables["params"])}
  for k, v in flatten_dict(variables["params"]).items():
    per_layer[k[0]] += math.prod(v.shape)
  # Layer by layer (no conv biases before a norm): the noise projector dominates.
  assert per_layer == {"noise_projector": 6_473_216, "mc_1": 442_880, "mc_2": 110_848, "mc_3": 27_776,
                       "mc_4": 6_976, "inv_1": 442_880, "inv_2": 110_848, "inv_3": 27_776, "inv_4": 6_976,
                       "final": 435}
  assert count(variables["params"]) == 7_650_611  # the paper's "7.7M"
  concat, _, _ = abstract_init(InvUNet(image_shape=(224, 224, 3), skip="concat"), 128)
  assert count(concat["params"]) == 7_846_451


def test_table4_3d_resolutions_instance_norm():
  variables, out, state = abstract_init(InvUNet(image_shape=(16, 192, 192, 1)), 512)
  assert out.shape == (2, 16, 192, 192, 1)
  rows = table4_rows(state)
  assert rows["bottleneck"] == ((1, 12, 12), 256)
  for k, (res, ch) in enumerate([((2, 24, 24), 128), ((4, 48, 48), 64), ((8, 96, 96), 32),
                                 ((16, 192, 192), 16)], start=1):
    assert rows[f"MC-{k}"] == (res, ch) and rows[f"Inv-{k}"] == (res, ch)
  assert "batch_stats" not in variables  # InstanceNorm: nothing depends on the batch


def test_cmi_baseline_sizes_at_224():
  small, out, _ = abstract_init(CMIGenerator(image_shape=(224, 224, 3), ngf=13), 128)
  large, _, _ = abstract_init(CMIGenerator(image_shape=(224, 224, 3), ngf=32), 128)
  assert out.shape == (2, 224, 224, 3)
  assert count(small["params"]) == 10_527_754  # paper: 10.6M
  assert count(large["params"]) == 25_947_299  # paper: 25.9M


@pytest.fixture(scope="module")
def small_2d():
  gen = InvUNet(image_shape=(32, 32, 3), channels=SMALL)
  z = jax.random.normal(jax.random.key(1), (4, 16))
  variables = jax.jit(lambda k: gen.init(k, z, train=True))(RBG0)
  return gen, z, variables


def test_invunet_2d_output_range_and_functional_batchnorm(small_2d):
  gen, z, variables = small_2d
  apply_train = jax.jit(lambda v, z: gen.apply(v, z, train=True, mutable=["batch_stats"]))
  out, new_state = apply_train(variables, z)
  out = np.asarray(out)
  assert out.shape == (4, 32, 32, 3) and np.all((out > 0) & (out < 1))
  assert out.std() > 1e-3  # not a constant image
  # BatchNorm state is explicit: training mode returns new running statistics, the input is untouched.
  old = flatten_dict(variables["batch_stats"])
  new = flatten_dict(new_state["batch_stats"])
  assert old.keys() == new.keys()
  assert any(not np.allclose(old[k], new[k]) for k in old)
  # Same inputs, same outputs: no hidden state.
  np.testing.assert_array_equal(np.asarray(apply_train(variables, z)[0]), out)
  # Evaluation mode reads the running averages and changes nothing.
  ev = jax.jit(lambda v, z: gen.apply(v, z, train=False))({**variables, **new_state}, z)
  assert ev.shape == out.shape and np.all(np.isfinite(ev))


def test_invunet_3d_tanh_range_and_batch_independence():
  gen = InvUNet(image_shape=(8, 16, 16, 1), channels=(4, 8, 16))
  z = jax.random.normal(jax.random.key(2), (3, 8))
  variables = jax.jit(lambda k: gen.init(k, z, train=True))(RBG0)
  apply = jax.jit(lambda v, z: gen.apply(v, z, train=True))
  out = np.asarray(apply(variables, z))
  assert out.shape == (3, 8, 16, 16, 1) and np.all(np.abs(out) < 1)
  # InstanceNorm: an image does not depend on the rest of its batch.
  np.testing.assert_allclose(np.asarray(apply(variables, z[:1]))[0], out[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(24, 40, 3), (6, 20, 12, 1)])
def test_output_follows_any_configured_shape(shape):
  for gen in (InvUNet(image_shape=shape, channels=(4, 8, 16)), CMIGenerator(image_shape=shape, ngf=4)):
    _, out, _ = abstract_init(gen, 8)
    assert out.shape == (2, *shape)


def test_cmi_generator_runs_in_2d_and_3d():
  for shape, lo in [((16, 16, 3), 0.0), ((4, 8, 8, 1), -1.0)]:
    gen = CMIGenerator(image_shape=shape, ngf=4)
    z = jax.random.normal(jax.random.key(3), (2, 8))
    variables = jax.jit(lambda k: gen.init(k, z, train=True))(RBG0)
    out = np.asarray(jax.jit(lambda v: gen.apply(v, z, train=True, mutable=["batch_stats"])[0])(variables))
    assert out.shape == (2, *shape) and np.all((out > lo) & (out < 1))


def test_bad_options_raise():
  z = jnp.zeros((1, 4))
  with pytest.raises(ValueError, match="skip must be 'add' or 'concat'"):
    InvUNet(image_shape=(16, 16, 3), skip="sum").init(jax.random.key(0), z)
  with pytest.raises(ValueError, match=r"\(H, W, C\) or \(D, H, W, C\)"):
    InvUNet(image_shape=(16, 3)).init(jax.random.key(0), z)
  with pytest.raises(ValueError, match="activation must be one of"):
    InvUNet(image_shape=(16, 16, 3), channels=(2, 4), activation="swish").init(jax.random.key(0), z)
