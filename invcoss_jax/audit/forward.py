"""What the audit asks of the frozen MAE: per-image features and per-image masked-reconstruction losses.

Both are jitted functions of (params, images, ...) that return one row per image and do not depend on the
other images of the batch, so padding a ragged last batch changes nothing.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from invcoss_jax import models

FEATURES = ("mean", "cls")


def pooled_features(tokens: jax.Array, kind: str) -> jax.Array:
  """(B, D) float32 feature of each image from the encoder output `(B, 1 + L, D)`: 'mean' of the patch
  tokens (CLS excluded: MAE never trains its CLS token directly) or the 'cls' token."""
  if kind == "mean":
    return jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1)
  if kind == "cls":
    return tokens[:, 0].astype(jnp.float32)
  raise ValueError(f"config.audit.feature must be 'mean' or 'cls', got {kind!r}")


def make_feature_fn(model: models.MAE, kind: str = "mean", normalize: bool = True) -> Callable:
  """(params, images) -> (B, D) float32 encoder features at mask ratio 0 (eval mode)."""
  if kind not in FEATURES:
    raise ValueError(f"config.audit.feature must be one of {FEATURES}, got {kind!r}")

  @jax.jit
  def features(params, images):
    tokens, _, _ = model.apply({"params": params}, images, mask_ratio=0.0, train=False, method=models.MAE.encode)
    f = pooled_features(tokens, kind)
    if normalize:
      f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    return f

  return features


def make_loss_fn(model: models.MAE, mask_ratio: float, num_masks: int) -> Callable:
  """(params, images, keys (B,) PRNG keys) -> (B,) float32 mean masked-reconstruction loss of each image
  over `num_masks` random masks. Image i's masks come from `keys[i]` only (one key per image, e.g. folded
  from its index), so its loss is the same in any batch."""
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"config.audit.mia_mask_ratio must be in (0, 1) (or < 0 for the stage's "
                     f"train.mask_ratio), got {mask_ratio}")
  if num_masks < 1:
    raise ValueError(f"config.audit.mia_num_masks must be >= 1, got {num_masks}")

  @jax.jit
  def losses(params, images, keys):
    rank = models.spatial_rank(images)
    grid = models.grid_shape(images.shape[1:-1], model.cfg.patch_size(rank))
    num_tokens = 1
    for g in grid:
      num_tokens *= g

    def one_mask(m):
      noise = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, m), (num_tokens,)))(keys)
      out = model.apply({"params": params}, images, mask_ratio=mask_ratio, train=False, noise=noise)
      return models.masked_mse(out["pred"], out["target"], out["mask"], per_sample=True)

    # lax.map: one traced model pass whatever num_masks (short compiles), masks evaluated in sequence.
    return jnp.mean(jax.lax.map(one_mask, jnp.arange(num_masks)), axis=0)

  return losses
