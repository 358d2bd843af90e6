"""ViT-MAE: patching, masking, position embeddings, loss and sown intermediates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invcoss_jax import models
from invcoss_jax.models import pos_embed


def _micro(**overrides):
  cfg = models.model_config("micro")
  cfg.update(overrides)
  return cfg


@pytest.mark.parametrize("shape,patch", [((2, 32, 48, 3), (16, 16)), ((2, 32, 32, 64, 1), (16, 16, 16)),
                                         ((1, 8, 12, 2), (4, 6))])
def test_patchify_unpatchify_inverse_and_reference(shape, patch):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  p = np.asarray(models.patchify(jnp.asarray(x), patch))
  grid = tuple(s // q for s, q in zip(shape[1:-1], patch))
  assert p.shape == (shape[0], int(np.prod(grid)), int(np.prod(patch)) * shape[-1])
  # Reference: explicit loops over the patch grid, (patch dims..., C) row-major inside a patch.
  ref = []
  for idx in np.ndindex(*grid):
    sl = tuple(slice(i * q, (i + 1) * q) for i, q in zip(idx, patch))
    ref.append(x[(slice(None),) + sl + (slice(None),)].reshape(shape[0], -1))
  np.testing.assert_array_equal(p, np.stack(ref, axis=1))
  np.testing.assert_array_equal(np.asarray(models.unpatchify(jnp.asarray(p), grid, patch, shape[-1])), x)


def test_patchify_rejects_indivisible_shapes():
  with pytest.raises(ValueError, match="not divisible"):
    models.patchify(jnp.zeros((1, 30, 32, 3)), (16, 16))


def test_sincos_2d_matches_mae_reference():
  dim, g = 32, 5
  def get_1d(d, pos):  # MAE's get_1d_sincos_pos_embed_from_grid
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), 0)
  ref = np.concatenate([get_1d(dim // 2, grid[0]), get_1d(dim // 2, grid[1])], axis=1)
  np.testing.assert_allclose(pos_embed.sincos_grid(dim, (g, g)), ref, atol=1e-6)


def test_sincos_3d_is_distinct_per_token():
  e = pos_embed.sincos_grid(64, (2, 3, 4))
  assert e.shape == (24, 64)
  d = np.linalg.norm(e[:, None] - e[None], axis=-1)
  assert np.all(d[~np.eye(24, dtype=bool)] > 1e-3)


def test_random_masking_keeps_exact_count_and_differs_per_sample():
  b, l, d = 8, 49, 4
  x = jnp.broadcast_to(jnp.arange(l, dtype=jnp.float32)[None, :, None], (b, l, d))
  noise = jax.random.uniform(jax.random.key(0), (b, l))
  kept, mask, ids_restore = models.random_masking(x, noise, 0.75)
  n_keep = int(l * 0.25)
  assert kept.shape == (b, n_keep, d)
  np.testing.assert_array_equal(np.asarray(mask.sum(1)), l - n_keep)
  # The kept tokens are exactly the unmasked positions, and masks differ between samples.
  for i in range(b):
    np.testing.assert_array_equal(np.sort(np.asarray(kept[i, :, 0])), np.flatnonzero(np.asarray(mask[i]) == 0))
  assert len({tuple(np.asarray(m).astype(int)) for m in mask}) == b
  # ids_restore undoes the shuffle.
  shuffled = jnp.take_along_axis(x, jnp.argsort(noise, 1)[..., None], 1)
  np.testing.assert_array_equal(np.asarray(jnp.take_along_axis(shuffled, ids_restore[..., None], 1)), np.asarray(x))


def test_normalised_pixel_loss_matches_numpy(shared_data=None):
  rng = np.random.default_rng(1)
  pred = rng.normal(size=(3, 10, 12)).astype(np.float32)
  patches = rng.uniform(size=(3, 10, 12)).astype(np.float32)
  mask = (rng.uniform(size=(3, 10)) < 0.7).astype(np.float32)
  t = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
  ref = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
  got = models.masked_mse(jnp.asarray(pred), models.normalized_pixel_targets(jnp.asarray(patches)), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_mae_loss_is_masked_only_and_uses_same_noise():
  model = models.build_mae(_micro())
  params = models.init_mae_params(model, jax.random.key(0), [(32, 32, 3)])
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(2), (2, 4))
  out = model.apply({"params": params}, x, mask_ratio=0.5, noise=noise)
  out2 = model.apply({"params": params}, x, mask_ratio=0.5, noise=noise)
  np.testing.assert_array_equal(np.asarray(out["mask"]), np.asarray(out2["mask"]))
  per_patch = np.mean((np.asarray(out["pred"]) - np.asarray(out["target"])) ** 2, -1)
  m = np.asarray(out["mask"])
  np.testing.assert_allclose(float(out["loss"]), (per_patch * m).sum() / m.sum(), rtol=1e-5)
  # Changing only visible... the prediction of masked patches never sees their pixels: perturb a masked patch.
  masked = np.argwhere(m[0] == 1)[0, 0]
  xp = np.asarray(x).copy()
  r, c = divmod(int(masked), 2)
  xp[0, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] += 5.0
  out3 = model.apply({"params": params}, jnp.asarray(xp), mask_ratio=0.5, noise=noise)
  np.testing.assert_allclose(np.asarray(out3["pred"]), np.asarray(out["pred"]), atol=1e-5)


@pytest.mark.parametrize("shape", [(32, 48, 3), (16, 32, 32, 1)])
def test_sown_intermediates_have_documented_shapes(shape):
  cfg = _micro()
  model = models.build_mae(cfg)
  params = models.init_mae_params(model, jax.random.key(0), [shape])
  x = jnp.zeros((3, *shape))
  (tokens, mask, _), state = model.apply({"params": params}, x, mask_ratio=0.0, method=models.MAE.encode,
                                          mutable=["intermediates"])
  blocks = models.block_tokens(state["intermediates"])
  n_tokens = 1 + int(np.prod([s // 16 for s in shape[:-1]]))
  assert len(blocks) == cfg.depth
  assert all(b.shape == (3, n_tokens, cfg.width) and b.dtype == jnp.float32 for b in blocks)
  assert tokens.shape == (3, n_tokens, cfg.width) and float(mask.sum()) == 0.0
  # With final_norm, the output equals LayerNorm(last block tokens), not the tokens themselves.
  assert not np.allclose(np.asarray(tokens), np.asarray(blocks[-1]))


def test_one_trunk_serves_2d_and_3d():
  model = models.build_mae(_micro())
  params = models.init_mae_params(model, jax.random.key(0), [(32, 32, 3), (16, 32, 32, 1)])
  assert {"patch_embed_2d", "patch_embed_3d", "decoder_pred_2d", "decoder_pred_3d", "encoder"} <= set(params)
  rngs = {"masking": jax.random.key(3)}
  a = model.apply({"params": params}, jnp.ones((1, 32, 32, 3)), mask_ratio=0.75, rngs=rngs)
  b = model.apply({"params": params}, jnp.ones((1, 16, 32, 32, 1)), mask_ratio=0.75, rngs=rngs)
  assert a["pred"].shape == (1, 4, 16 * 16 * 3) and b["pred"].shape == (1, 4, 16 ** 3)
  with pytest.raises(ValueError, match="channel"):
    model.apply({"params": params}, jnp.ones((1, 32, 32, 1)), mask_ratio=0.75, rngs=rngs)


def test_bf16_remat_learned_pos_drop_path_train_and_match_fp32():
  # Every model call is jitted, as training runs them: op by op, each of the many small primitives of a
  # bf16 + remat forward is compiled on its own (about 25 s on a CPU, against about 8 s for these few programs).
  cfg32 = _micro(pos_embed="learned", layer_scale_init=1e-3)
  cfg16 = _micro(pos_embed="learned", layer_scale_init=1e-3, dtype="bfloat16", remat=True)
  m32, m16 = models.build_mae(cfg32), models.build_mae(cfg16)
  params = jax.jit(lambda k: models.init_mae_params(m32, k, [(32, 32, 3)]))(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(2), (2, 4))
  loss = lambda m: jax.jit(lambda p: m.apply({"params": p}, x, mask_ratio=0.75, noise=noise)["loss"])
  l32, l16 = loss(m32)(params), loss(m16)(params)
  assert l16.dtype == jnp.float32
  np.testing.assert_allclose(float(l16), float(l32), rtol=5e-2)
  # Learned position tables are interpolated to other grids; drop-path needs and uses the dropout stream.
  cfg_dp = _micro(drop_path=0.5)
  m = models.build_mae(cfg_dp)
  p = jax.jit(lambda k: models.init_mae_params(m, k, [(32, 32, 3)]))(jax.random.key(0))
  f = jax.jit(lambda k: m.apply({"params": p}, x, mask_ratio=0.0, train=True, rngs={"dropout": k})["pred"])
  assert not np.allclose(np.asarray(f(jax.random.key(0))), np.asarray(f(jax.random.key(1))))
  other_grid = jax.jit(lambda p: m16.apply({"params": p}, jnp.ones((1, 48, 64, 3)), mask_ratio=0.5,
                                           rngs={"masking": jax.random.key(0)})["pred"])
  assert other_grid(params).shape == (1, 12, 768)


def test_vit_base_has_86m_encoder_parameters():
  model = models.build_mae(models.model_config("base"))
  shapes = jax.eval_shape(lambda r: models.init_mae_params(model, r, [(224, 224, 3)]), jax.random.key(0))
  n = sum(x.size for k in ("encoder", "patch_embed_2d", "cls_token") for x in jax.tree.leaves(shapes[k]))
  assert 85e6 < n < 87e6
