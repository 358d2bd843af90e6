"""Fine-tuning losses, pure functions of arrays, float32 whatever the compute dtype.

`weights` `(B,)` (1 for real examples, 0 for padding) make every loss a weighted mean over examples,
so a padded last batch does not bias it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

DICE_SMOOTH = 1.0  # MedCoSS's soft Dice adds 1 to numerator and denominator


def _weighted_mean(per_example: jnp.ndarray, weights: jnp.ndarray | None) -> jnp.ndarray:
  if weights is None:
    return jnp.mean(per_example)
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def classification_loss(logits: jnp.ndarray, labels: jnp.ndarray,
                        weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """Softmax cross-entropy; `logits` `(B, C)`, `labels` `(B,)` integer."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels.astype(jnp.int32))
  return _weighted_mean(ce, weights)


def _soft_dice_per_example(probs: jnp.ndarray, onehot: jnp.ndarray) -> jnp.ndarray:
  """Soft Dice per example and channel, `(B, K)`; spatial axes are summed."""
  axes = tuple(range(1, probs.ndim - 1))
  inter = jnp.sum(probs * onehot, axis=axes)
  denom = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
  return (2.0 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)


def dice_ce_loss(logits: jnp.ndarray, labels: jnp.ndarray, weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """Softmax cross-entropy + (1 - soft Dice over the foreground classes).

  `logits` `(B, *spatial, C)` with C including background (class 0); `labels` `(B, *spatial)` ints.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  c = logits.shape[-1]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  ce = jnp.mean(ce.reshape(ce.shape[0], -1), axis=1)
  dice = _soft_dice_per_example(jax.nn.softmax(logits)[..., 1:], jax.nn.one_hot(labels, c)[..., 1:])
  return _weighted_mean(ce + 1.0 - jnp.mean(dice, axis=-1), weights)


def dice_bce_loss(logits: jnp.ndarray, labels: jnp.ndarray, weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """MedCoSS's loss: per-channel sigmoid BCE + (1 - soft Dice), one channel per foreground class.

  `logits` `(B, *spatial, K)` for classes 1..K; `labels` `(B, *spatial)` ints in [0, K].
  """
  logits = logits.astype(jnp.float32)
  k = logits.shape[-1]
  target = jax.nn.one_hot(labels.astype(jnp.int32) - 1, k)  # label 0 -> all-zero row
  bce = optax.sigmoid_binary_cross_entropy(logits, target)
  bce = jnp.mean(bce.reshape(bce.shape[0], -1), axis=1)
  dice = _soft_dice_per_example(jax.nn.sigmoid(logits), target)
  return _weighted_mean(bce + 1.0 - jnp.mean(dice, axis=-1), weights)


def segmentation_probs(logits: jnp.ndarray, loss: str) -> jnp.ndarray:
  """Class probabilities matching the loss: softmax (C classes) or sigmoid (K foreground channels)."""
  if loss == "dice_ce":
    return jax.nn.softmax(logits.astype(jnp.float32))
  if loss == "dice_bce":
    return jax.nn.sigmoid(logits.astype(jnp.float32))
  raise ValueError(f"evaluate seg_loss={loss!r}: expected 'dice_ce' or 'dice_bce'")


def probs_to_labels(probs: np.ndarray, loss: str) -> np.ndarray:
  """Label map (int32, on the host) from probabilities: argmax (softmax), or MedCoSS's rule for sigmoid
  channels (every channel above 0.5 writes its class, later channels win)."""
  probs = np.asarray(probs)
  if loss == "dice_ce":
    return probs.argmax(axis=-1).astype(np.int32)
  labels = np.zeros(probs.shape[:-1], np.int32)
  for k in range(probs.shape[-1]):
    labels = np.where(probs[..., k] > 0.5, k + 1, labels)
  return labels.astype(np.int32)
