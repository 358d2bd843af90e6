"""What a loss term of the inversion objective can read: the synthetic batch and the frozen model's view of it.

Model outputs are computed lazily on first access and cached, so a switched-off term costs nothing (e.g.
with loss_weights.task = 0 the masked MAE pass is never traced) and terms that share a pass share it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from invcoss_jax.inversion import statistics
from invcoss_jax.inversion.config import ProgramSpec, program_spec
from invcoss_jax.measure import features as measure_features


REP_FEATURES = ("mean", "cls", "centered_mean")


def rep_features(tokens: jax.Array, kind: str, *, last_block=None, target_stats=None) -> jax.Array:
  """The L_rep feature `(B, D)` of each image.

  'mean' (default): mean of the patch tokens (CLS excluded) of the encoder output `tokens` `(B, 1 + L, D)`,
  the feature MedCoSS clusters its replay buffer on; an MAE never trains its CLS token directly, so the mean
  token is more informative. 'cls': the CLS token of `tokens`. 'centered_mean': the mean patch token of the
  last block's output `last_block` minus its mean over the real data, which the stored statistics give
  exactly (the mean over positions of `target_stats.mean[-1, 1:]`): cosine similarities then measure
  directions around the data mean rather than the component every image shares (data-free).
  """
  if kind in ("mean", "cls"):
    return measure_features.pooled_feature(tokens, kind)
  if kind == "centered_mean":
    if last_block is None or target_stats is None:
      raise ValueError("rep_feature 'centered_mean' needs the last block's tokens and the stored statistics")
    center = jnp.mean(jnp.asarray(target_stats.mean, jnp.float32)[-1, 1:], axis=0)
    return jnp.mean(last_block[:, 1:].astype(jnp.float32), axis=1) - center
  raise ValueError(f"config.inversion.rep_feature must be one of {list(REP_FEATURES)}, got {kind!r}")


class InversionContext:
  """The synthetic batch, the frozen model and everything derived from them, for the loss terms.

  Attributes set at construction:
    images: `(B, H, W, C)` / `(B, D, H, W, C)` float32 synthetic images (a function of the optimised variables);
      the pixel-space terms read these.
    model_images: what the frozen model is shown (`images` unless config.inversion.jitter rolls them).
    model, params: the frozen MAE of the previous stage and its parameters (not optimised).
    target_stats: the stage's stored `FeatureStats` (float32 `(num_blocks, 1 + L, D)` mean and var).
    rng: a PRNG key for this step (used for the L_task masking).
    pool: `(P, F)` persistent feature pool; pool_count: number of features written before this batch.
    attempt: the retry index of this batch (0 first).
    spec: the `ProgramSpec` of config.inversion (the options the compiled program depends on; a
      config.inversion ConfigDict given here is read into one).
  Lazily computed: `encoder_outputs`, `block_tokens`, `tokens`, `feature_moments`, `features`,
  `pool_with_batch`, `mae_outputs`.
  """

  def __init__(self, *, images: jax.Array, model: Any, params: Any, target_stats: statistics.FeatureStats,
               rng: jax.Array, pool: jax.Array, pool_count: jax.Array, spec: ProgramSpec,
               attempt: jax.Array | int = 0, model_images: jax.Array | None = None):
    self.images = images
    self.model_images = images if model_images is None else model_images
    self.model = model
    self.params = params
    self.target_stats = target_stats
    self.rng = rng
    self.pool = pool
    self.pool_count = pool_count
    self.spec = program_spec(spec)
    self.attempt = attempt

  @functools.cached_property
  def encoder_outputs(self) -> tuple[list[jax.Array], jax.Array]:
    """(per-block tokens, final encoder tokens) of the unmasked eval-mode pass."""
    return statistics.encoder_forward(self.model, self.params, self.model_images)

  @property
  def block_tokens(self) -> list[jax.Array]:
    return self.encoder_outputs[0]

  @property
  def tokens(self) -> jax.Array:
    return self.encoder_outputs[1]

  @functools.cached_property
  def feature_moments(self) -> statistics.FeatureStats:
    """Per-block mean and biased variance over the batch of the synthetic images' tokens (float32)."""
    return statistics.block_token_moments([t.astype(jnp.float32) for t in self.block_tokens])

  @functools.cached_property
  def features(self) -> jax.Array:
    """`(B, F)` features of the synthetic images for L_rep (config.inversion.rep_feature)."""
    return rep_features(self.tokens, self.spec.rep_feature, last_block=self.block_tokens[-1],
                        target_stats=self.target_stats)

  @functools.cached_property
  def pool_with_batch(self) -> tuple[jax.Array, jax.Array]:
    """(pool, valid) with this batch's own features (no gradient) in its slots, as Eq. 5's pool holds every
    synthetic sample; slots run round-robin from `pool_count`."""
    p, b = self.pool.shape[0], self.features.shape[0]
    slots = (self.pool_count + jnp.arange(b)) % p
    pool = self.pool.at[slots].set(jax.lax.stop_gradient(self.features).astype(self.pool.dtype))
    filled = jnp.minimum(self.pool_count + b, p)
    valid = (jnp.arange(p) < filled).astype(jnp.float32)
    return pool, valid

  @functools.cached_property
  def mae_outputs(self) -> dict[str, jax.Array]:
    """The frozen MAE on the synthetic images with random masking (eval mode): pred, target, mask, loss."""
    return self.model.apply({"params": self.params}, self.model_images, mask_ratio=self.spec.task_mask_ratio,
                            train=False, rngs={"masking": self.rng})
