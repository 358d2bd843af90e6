"""Downstream heads and losses: shapes on real demo images (2D and 3D), invariances, the transposed-
convolution equivalence, NumPy references for the losses, and the frozen encoder of a linear probe."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invcoss_jax import data as data_lib
from invcoss_jax.evaluate import finetune, heads, losses
from invcoss_jax.evaluate.config import task_config
from invcoss_jax.models.presets import model_config
from invcoss_jax.train import core


def init(model, shape, seed=0):
  return jax.jit(lambda r: model.init(r, shape))(jax.random.PRNGKey(seed))


def apply(model, params, images):
  return jax.jit(model.apply)(params, images)


def tiny_model(depth=2):
  m = model_config("micro")
  m.width, m.depth, m.num_heads = 32, depth, 2
  m.patch_size_2d, m.patch_size_3d = (8, 8), (8, 8, 8)
  return m


@pytest.fixture(scope="module")
def xray_batch():
  t = task_config("pneumonia")
  t.data.image_size = 32
  return next(data_lib.make_eval_iterator(t.data, batch_size=3, split="val"))


@pytest.fixture(scope="module")
def mri_batch():
  t = task_config("hippocampus")
  t.data.volume_shape = (16, 24, 16)
  return next(data_lib.make_eval_iterator(t.data, batch_size=2, split="val"))


def test_upsampling_plan_and_feature_blocks():
  assert heads.upsampling_plan((16, 16)) == [(2, 2)] * 4
  # An axis with a smaller patch is only upsampled at the finest levels.
  assert heads.upsampling_plan((4, 16, 16)) == [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
  assert heads.feature_blocks(12, 4) == [3, 6, 9, 12]  # UNETR's blocks for ViT-B/16
  assert heads.feature_blocks(4, 3) == [2, 3, 4]
  assert heads.feature_blocks(2, 4) == [1, 1, 2, 2]
  assert heads.feature_blocks(12, 4, (2, 4, 6, 8)) == [2, 4, 6, 8]
  with pytest.raises(ValueError, match="unetr_blocks"):
    heads.feature_blocks(12, 4, (3, 6, 13, 12))
  with pytest.raises(ValueError, match="powers of two"):
    heads.upsampling_plan((12, 12))


@pytest.mark.parametrize("factors,shape", [((2, 2), (2, 3, 4, 5)), ((2, 1, 2), (2, 3, 2, 4, 6))])
def test_upsample_equals_transposed_convolution(factors, shape):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  kernel = rng.normal(size=(*factors, shape[-1], 7)).astype(np.float32)
  up = heads.UpSample(7, factors)
  params = {"params": {"kernel": kernel}}
  conv = nn.ConvTranspose(7, factors, strides=factors, padding="VALID", use_bias=False)
  flipped = np.flip(kernel, axis=tuple(range(len(factors))))
  want = jax.jit(conv.apply)({"params": {"kernel": flipped}}, x)
  got = jax.jit(up.apply)(params, x)
  assert got.shape == (shape[0], *(s * f for s, f in zip(shape[1:-1], factors)), 7)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_classification_head_pools_patch_tokens_only():
  tokens = jax.random.normal(jax.random.PRNGKey(0), (4, 1 + 9, 16))
  head = heads.ClassificationHead(3)
  params = jax.jit(head.init)(jax.random.PRNGKey(1), tokens)
  run = jax.jit(head.apply)
  logits = run(params, tokens)
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  other_cls = tokens.at[:, 0].set(100.0)  # the CLS token is excluded
  np.testing.assert_allclose(run(params, other_cls), logits, atol=1e-6)
  perm = jnp.concatenate([tokens[:, :1], tokens[:, 1:][:, ::-1]], axis=1)  # mean pooling: order-free
  np.testing.assert_allclose(run(params, perm), logits, atol=1e-5)
  pooled = nn.LayerNorm(epsilon=1e-6).apply({"params": params["params"]["fc_norm"]}, tokens[:, 1:].mean(1))
  ref = pooled @ params["params"]["head"]["kernel"] + params["params"]["head"]["bias"]
  np.testing.assert_allclose(logits, ref, atol=1e-5)


def _seg_task(loss="dice_ce", num_classes=3, blocks=()):
  t = task_config("hippocampus")
  t.seg_loss, t.num_classes, t.unetr_feature_size, t.unetr_blocks = loss, num_classes, 4, blocks
  return t


@pytest.mark.parametrize("dims,loss,channels", [(2, "dice_bce", 2), (3, "dice_ce", 3)])
def test_downstream_shapes_on_real_images(dims, loss, channels, xray_batch, mri_batch):
  images = np.asarray((xray_batch if dims == 2 else mri_batch)["image"])
  shape = images.shape[1:]
  cls = finetune.build_model(task_config("pneumonia"), tiny_model(), "finetune", shape)
  p = init(cls, shape)
  assert set(p) == {"backbone", "head"} and "decoder" not in p["backbone"]
  logits = apply(cls, p, images)
  assert logits.shape == (images.shape[0], 2) and logits.dtype == jnp.float32

  if dims == 2:  # 3 decoder levels for 8-pixel patches, fed by the configured blocks
    m, blocks = tiny_model(depth=4), (1, 2, 3)
  else:  # evenly spread over 2 blocks; bfloat16 compute, float32 parameters and logits
    m, blocks = tiny_model(depth=2), ()
    m.dtype = "bfloat16"
  seg = finetune.build_model(_seg_task(loss, blocks=blocks), m, "finetune", shape)
  assert seg.blocks == ((1, 2, 3) if dims == 2 else (1, 2, 2))
  p = init(seg, shape)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  run = jax.jit(seg.apply)
  out = run(p, images)
  # dice_bce: one sigmoid channel per foreground class; dice_ce: softmax over all 3 classes.
  assert out.shape == (*images.shape[:-1], channels) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  if dims == 2:
    # Perturbing block 4 (not fed to the decoder) changes nothing; perturbing block 2 (a skip) does.
    for block, changes in (("block_3", False), ("block_1", True)):
      q = jax.tree_util.tree_map(lambda x: x, p)
      fc2 = q["backbone"]["encoder"][block]["fc2"]
      fc2["bias"] = fc2["bias"] + 1.0
      diff = float(jnp.abs(run(q, images) - out).max())
      assert (diff > 1e-4) == changes, (block, diff)


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_losses_match_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(3, 5, 6))
  w = np.array([1.0, 1.0, 0.0], np.float32)
  # softmax CE + (1 - soft Dice over foreground classes), per example, weighted mean.
  p = _np_softmax(logits.astype(np.float64))
  onehot = np.eye(4)[labels]
  ce = -np.log(np.take_along_axis(p, labels[..., None], -1)[..., 0]).mean(axis=(1, 2))
  inter = (p * onehot).sum(axis=(1, 2))[:, 1:]
  den = (p.sum(axis=(1, 2)) + onehot.sum(axis=(1, 2)))[:, 1:]
  dice = ((2 * inter + 1) / (den + 1)).mean(-1)
  ref = ((ce + 1 - dice) * w).sum() / w.sum()
  assert float(jax.jit(losses.dice_ce_loss)(logits, labels, w)) == pytest.approx(ref, rel=1e-5)
  # sigmoid BCE + Dice with one channel per foreground class (labels 1..3 -> channels 0..2).
  lg = logits[..., :3].astype(np.float64)
  s = 1 / (1 + np.exp(-lg))
  t = np.eye(4)[labels][..., 1:]
  bce = -(t * np.log(s) + (1 - t) * np.log(1 - s)).mean(axis=(1, 2, 3))
  inter = (s * t).sum(axis=(1, 2))
  dice = ((2 * inter + 1) / (s.sum(axis=(1, 2)) + t.sum(axis=(1, 2)) + 1)).mean(-1)
  ref = (bce + 1 - dice).mean()
  assert float(jax.jit(losses.dice_bce_loss)(logits[..., :3], labels)) == pytest.approx(ref, rel=1e-5)
  y = rng.integers(0, 3, size=5)
  ref = -np.log(_np_softmax(logits[0, :, 0, :3].astype(np.float64))[np.arange(5), y]).mean()
  assert float(jax.jit(losses.classification_loss)(logits[0, :, 0, :3], y)) == pytest.approx(ref, rel=1e-5)


def test_probs_to_labels_rules():
  probs = np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
  np.testing.assert_array_equal(losses.probs_to_labels(probs, "dice_ce"), [1, 0])
  sig = np.array([[0.9, 0.8], [0.9, 0.2], [0.1, 0.4]])  # later channels win (MedCoSS)
  np.testing.assert_array_equal(losses.probs_to_labels(sig, "dice_bce"), [2, 1, 0])


def test_linear_probe_freezes_the_encoder(xray_batch):
  images = np.asarray(xray_batch["image"])
  labels = np.asarray(xray_batch["label"]).reshape(-1).astype(np.int32)
  task = task_config("pneumonia")
  task.lr = 1e-2
  for protocol, frozen in (("linear", True), ("finetune", False)):
    model = finetune.build_model(task, tiny_model(depth=1), protocol, images.shape[1:])
    params = init(model, images.shape[1:], 0)
    tx, sched = finetune.make_optimizer(task, 10, params, model.freeze_backbone)
    state = core.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params),
                                rng=jax.random.PRNGKey(1))
    step = jax.jit(finetune.make_train_step(model, tx, sched, losses.classification_loss))
    new, m = step(state, {"image": images, "target": labels})
    assert np.isfinite(float(m["loss"]))
    moved = lambda a, b: any(float(jnp.abs(x - y).max()) > 0 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert moved(new.params["head"], params["head"])
    assert moved(new.params["backbone"], params["backbone"]) == (not frozen), protocol


def test_init_params_takes_pretrained_subtrees_and_checks_shapes():
  model = finetune.build_model(task_config("pneumonia"), tiny_model(depth=1), "finetune", (16, 16, 3))
  rng = jax.random.PRNGKey(0)
  fresh, loaded = finetune.init_params(model, rng, (16, 16, 3))
  assert loaded == [] and set(fresh) == {"backbone", "head"}
  other = init(model, (16, 16, 3), 1)["backbone"]
  partial = {k: v for k, v in other.items() if k != "cls_token"}
  merged, loaded = finetune.init_params(model, rng, (16, 16, 3), dict(partial, decoder={"x": jnp.zeros(1)}), "ckpt")
  assert sorted(loaded) == sorted(partial)
  np.testing.assert_array_equal(merged["backbone"]["encoder"]["block_0"]["fc1"]["kernel"],
                                other["encoder"]["block_0"]["fc1"]["kernel"])
  np.testing.assert_array_equal(merged["backbone"]["cls_token"], fresh["backbone"]["cls_token"])  # kept fresh
  jax.tree.map(np.testing.assert_array_equal, merged["head"], fresh["head"])  # same seed, same head
  bad = dict(other, cls_token=jnp.zeros((1, 1, 8)))
  with pytest.raises(ValueError, match="cls_token"):
    finetune.init_params(model, rng, (16, 16, 3), bad, "ckpt")
