"""What the audit asks of the frozen MAE: per-image features and per-image masked-reconstruction losses.

Both are jitted functions of (params, images, ...) that return one row per image and do not depend on the
other images of the batch, so padding a ragged last batch changes nothing.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from invcoss_jax import models
from invcoss_jax.measure import features

FEATURES = ("mean", "cls")


def make_feature_fn(model: models.MAE, kind: str = "mean", normalize: bool = True) -> Callable:
  """(params, images) -> (B, D) float32 encoder features at mask ratio 0 (eval mode): the one compiled feature
  function (measure.features.feature_fn), with the audit's choice of features."""
  if kind not in FEATURES:
    raise ValueError(f"config.audit.feature must be one of {FEATURES}, got {kind!r}")
  return features.feature_fn(model, kind, normalize, option="config.audit.feature")


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
