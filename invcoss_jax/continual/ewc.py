"""EWC's empirical Fisher information of the MAE loss, on the encoder side (Kirkpatrick et al. 2017).

F_i = (1/N) sum_n (d L_MAE(x_n) / d theta_i)^2 over examples of the stage just trained, each with its own
fixed random mask; per-example gradients are computed `fisher_batch_size` at a time (vmap). Online EWC keeps
one penalty: F <- gamma F_previous + F_stage, anchored at the newest parameters.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from invcoss_jax.continual.params import merge_params, split_params
from invcoss_jax.continual.step import mae_forward, num_patches


def empirical_fisher(model, params, batches: Iterable, *, mask_ratio: float, rng: jax.Array,
                     num_examples: int = -1, batch_size: int = 8) -> tuple[Any, int]:
  """(Fisher diagonal as a float32 NumPy tree like the encoder side of `params`, examples used).

  `batches` yields image arrays or dicts with 'image' (the stage's eval iterator); `num_examples` <= 0 uses
  all of them. The per-example mask noise is fold_in(rng, example index)."""
  enc, dec = split_params(params)

  def one_loss(e, x, noise):
    loss, _ = mae_forward(model, merge_params(e, dec), x[None], noise[None], mask_ratio=mask_ratio, train=False)
    return loss

  @jax.jit
  def sum_sq_grads(e, x, noise, w):
    g = jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0))(e, x, noise)
    return jax.tree.map(lambda t: jnp.einsum("b,b...->...", w, jnp.square(t.astype(jnp.float32))), g)

  total, used = None, 0
  limit = int(num_examples) if int(num_examples) > 0 else None

  def flush(x):
    nonlocal total, used
    n = x.shape[0]
    w = np.zeros((batch_size,), np.float32)
    w[:n] = 1.0
    if n < batch_size:  # padded rows carry weight 0
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
    l = num_patches(model.cfg, x.shape[1:])
    noise = jnp.stack([jax.random.uniform(jax.random.fold_in(rng, used + i), (l,)) for i in range(batch_size)])
    s = jax.device_get(sum_sq_grads(enc, x, noise, w))
    total = s if total is None else jax.tree.map(np.add, total, s)
    used += n

  pending = np.zeros((0,), np.float32)
  for batch in batches:
    x = np.asarray(batch["image"] if isinstance(batch, dict) else batch, np.float32)
    if limit is not None:
      x = x[:max(0, limit - used - len(pending))]
    pending = x if len(pending) == 0 else np.concatenate([pending, x])
    while len(pending) >= batch_size:
      flush(pending[:batch_size])
      pending = pending[batch_size:]
    if limit is not None and used + len(pending) >= limit:
      break
  if len(pending):
    flush(pending)
  if total is None or used == 0:
    raise ValueError("EWC: the stage's data yielded no examples for the Fisher information")
  return jax.tree.map(lambda t: np.asarray(t, np.float32) / used, total), used


def online_update(previous_fisher: Any | None, stage_fisher: Any, gamma: float) -> Any:
  """gamma * F_previous + F_stage (F_stage alone for the first stage)."""
  if previous_fisher is None:
    return stage_fisher
  return jax.tree.map(lambda a, b: np.asarray(gamma * a + b, np.float32), previous_fisher, stage_fisher)
