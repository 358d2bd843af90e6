"""The private gradient of a DP-SGD step, on jax-privacy: per-example gradients of the loss (vmap over batches of
one example, `microbatch_size` of them at a time), each clipped to L2 norm `clip_norm`, summed, Gaussian noise of
standard deviation noise_multiplier x clip_norm added, and divided by the expected batch size.

`train.core.make_step(..., privacy=plan)` calls `private_gradient`; the batch carries `PADDING_KEY`, a bool per
row (True: a padding row of a Poisson batch, whose clipped gradient is zeroed), which the loss never sees.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

# _JAX_PRIVACY: jax-privacy (and dp-accounting, which its package imports) are imported where a DP step is
# built, not here: train.core imports this module, and every run, DP or not, would pay their 0.8 s import.

PADDING_KEY = "dp_padding"


class Spec(Protocol):
  """What the step needs of a plan (privacy.accounting.DpSgdPlan has it)."""
  clip_norm: float
  noise_multiplier: float
  expected_batch_size: int
  microbatch_size: int


def clipped_gradient_sum(loss_fn: Callable, clip_norm: float, microbatch_size: int | None = None) -> Callable:
  """fn(trainable, batch, consts, rng, padding) -> (sum of the per-example gradients of `loss_fn` clipped to L2
  norm `clip_norm`, per-example (values, grad_norms before clipping, the loss's metrics)).

  Each example is its own batch of one (`loss_fn` sees a leading axis of 1) with its own key, split from `rng`
  by its row; padding rows contribute zero (jax-privacy's clipped_grad; NaN or inf gradients are zeroed)."""
  from jax_privacy import clipping  # pylint: disable=g-import-not-at-top  (see _JAX_PRIVACY)
  grad = clipping.clipped_grad(loss_fn, argnums=0, has_aux=True, l2_clip_norm=float(clip_norm), batch_argnums=1,
                               prng_argnum=3, microbatch_size=microbatch_size or None, return_values=True,
                               return_grad_norms=True)

  def fn(trainable, batch, consts, rng, padding):
    summed, aux = grad(trainable, batch, consts, rng, is_padding_example=padding)
    return summed, (aux.values, aux.grad_norms, aux.aux)

  return fn


def gaussian_noise(tree: Any, stddev: float, key: jax.Array) -> Any:
  """`tree` plus i.i.d. N(0, stddev^2) noise drawn from `key` (jax-privacy's gaussian_privatizer, started from
  `key` for this one release)."""
  from jax_privacy import noise_addition  # pylint: disable=g-import-not-at-top  (see _JAX_PRIVACY)
  privatizer = noise_addition.gaussian_privatizer(stddev=float(stddev), prng_key=key)
  noisy, _ = privatizer.update(tree, privatizer.init(tree))
  return noisy


def _real_mean(x: jax.Array, real: jax.Array, count: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32).reshape(real.shape[0], -1).mean(axis=1)
  return jnp.sum(jnp.where(real, x, 0.0)) / count


def private_gradient(loss_fn: Callable, spec: Spec) -> Callable:
  """fn(trainable, batch, consts, rng) -> (loss, metrics, gradient) of one DP-SGD step.

  `batch` is a dict with `PADDING_KEY`; `rng` the step's key: the examples' keys and the noise's key are split
  from it, so a resumed run draws the same noise. The gradient is (clipped sum + noise) / expected_batch_size;
  loss and the loss's metrics are means over the real rows; 'dp_clipped_fraction' is the fraction of real rows
  whose gradient norm exceeded clip_norm, 'dp_batch_size' the real rows."""
  clip, sigma, expected = float(spec.clip_norm), float(spec.noise_multiplier), float(spec.expected_batch_size)
  summed_fn = clipped_gradient_sum(loss_fn, clip, int(spec.microbatch_size))

  def fn(trainable, batch, consts, rng):
    batch = dict(batch)
    padding = batch.pop(PADDING_KEY).astype(bool)
    example_rng, noise_rng = jax.random.split(rng)
    summed, (values, norms, extra) = summed_fn(trainable, batch, consts, example_rng, padding)
    grads = jax.tree.map(lambda g: g / expected, gaussian_noise(summed, sigma * clip, noise_rng))
    real = ~padding
    count = jnp.maximum(jnp.sum(real), 1).astype(jnp.float32)
    metrics = {name: _real_mean(v, real, count) for name, v in (extra or {}).items()}
    metrics["dp_clipped_fraction"] = jnp.sum(real & (norms > clip)) / count
    metrics["dp_batch_size"] = jnp.sum(real).astype(jnp.float32)
    return _real_mean(values, real, count), metrics, grads

  return fn
