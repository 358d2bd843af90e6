"""The regularisers of continual pre-training as pure functions of arrays (float32 accumulation).

- `feature_distillation`: L_reg of Eq. 4 as MedCoSS computes it, the mean squared error between the student's
  and the frozen teacher's encoder output tokens (CLS included) under the same mask.
- `ewc_penalty`: EWC's quadratic anchor, lambda/2 * sum_i F_i (theta_i - theta*_i)^2.
- `intra_modal_mixup`: MedCoSS's mixup of buffer images with a partner from the same batch (host side, NumPy).
- `token_mixup`: its text form: each token (id and attention bit) comes from the sample or from its partner.
- `sample_weighted_mean`: the mean over every sample of per-group mean losses (sub-batches of one step).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def feature_distillation(student_tokens: jax.Array, teacher_tokens: jax.Array,
                         valid: jax.Array | None = None) -> jax.Array:
  """Mean over batch, tokens and features of the squared difference; the teacher gets no gradient.

  `valid` (B, T), 1 for the tokens that count: text keeps its padding positions out of the mean (their
  outputs are never read downstream); None counts every token (images: CLS and the kept patches)."""
  if student_tokens.shape != teacher_tokens.shape:
    raise ValueError(f"feature distillation needs student and teacher tokens of one shape, got "
                     f"{student_tokens.shape} and {teacher_tokens.shape}")
  diff = student_tokens.astype(jnp.float32) - jax.lax.stop_gradient(teacher_tokens).astype(jnp.float32)
  if valid is None:
    return jnp.mean(jnp.square(diff))
  w = valid.astype(jnp.float32)
  if w.shape != diff.shape[:2]:
    raise ValueError(f"feature distillation: valid {w.shape} must be (batch, tokens) = {diff.shape[:2]}")
  per_token = jnp.mean(jnp.square(diff), axis=-1)
  return jnp.sum(per_token * w) / jnp.maximum(jnp.sum(w), 1.0)


def ewc_penalty(params: Any, anchor: Any, fisher: Any) -> jax.Array:
  """sum over every leaf of 0.5 * F * (theta - theta*)^2 (float32); the weight lambda is applied by the caller.

  `anchor` and `fisher` are trees of the same structure as `params` (the encoder side of the MAE)."""
  terms = jax.tree.map(
      lambda p, a, f: jnp.sum(f.astype(jnp.float32) * jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))),
      params, anchor, fisher)
  return 0.5 * sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def sample_weighted_mean(values: Sequence[jax.Array], counts: Sequence[int]) -> jax.Array:
  """sum_g n_g v_g / sum_g n_g: per-group means combined as one mean over all samples (0 for no groups)."""
  if len(values) != len(counts):
    raise ValueError(f"got {len(values)} values and {len(counts)} counts")
  total = sum(counts)
  if not values or total == 0:
    return jnp.zeros((), jnp.float32)
  return sum(v.astype(jnp.float32) * (n / total) for v, n in zip(values, counts))


def intra_modal_mixup(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """x_i <- lam_i x_i + (1 - lam_i) x_perm(i) with lam_i ~ U(0, 1) and a random permutation of the batch.

  `images` must hold samples of one modality (MedCoSS mixes within a homogeneous batch). Returns
  (mixed float32 images, lam (B,), perm (B,)).
  """
  x = np.asarray(images, np.float32)
  b = x.shape[0]
  lam = rng.uniform(0.0, 1.0, size=(b,)).astype(np.float32)
  perm = rng.permutation(b)
  shape = (b,) + (1,) * (x.ndim - 1)
  mixed = lam.reshape(shape) * x + (1.0 - lam.reshape(shape)) * x[perm]
  return mixed.astype(np.float32), lam, perm


def token_mixup(tokens: np.ndarray, attention_mask: np.ndarray, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """MedCoSS's intra-modal mixup of text: a random partner perm(i) from the same batch and a ratio
  lam_i ~ U(0, 1) per sample; every position takes the sample's token (id and attention bit) where a
  uniform draw is below lam_i, else the partner's, so about lam_i of the tokens stay the sample's.

  Returns (mixed ids, mixed attention mask, lam (B,), keep (B, L) bool: True where the sample's token stayed).
  """
  t = np.asarray(tokens)
  a = np.asarray(attention_mask)
  if t.shape != a.shape or t.ndim != 2:
    raise ValueError(f"token mixup: tokens {t.shape} and attention_mask {a.shape} must be equal (batch, length)")
  b = t.shape[0]
  lam = rng.uniform(0.0, 1.0, size=(b,)).astype(np.float32)
  perm = rng.permutation(b)
  keep = rng.uniform(0.0, 1.0, size=t.shape) < lam[:, None]
  return np.where(keep, t, t[perm]).astype(t.dtype), np.where(keep, a, a[perm]).astype(a.dtype), lam, keep
