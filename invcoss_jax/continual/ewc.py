"""EWC's empirical Fisher information of the MAE loss, on the encoder side (Kirkpatrick et al. 2017).

F_i = (1/N) sum_n (d L(x_n) / d theta_i)^2 over examples of the stage just trained (L: the MAE loss, or the
MLM loss of a report stage), each with its own fixed random mask; per-example gradients are computed `fisher_batch_size` at a time (vmap). Online EWC keeps
one penalty: F <- gamma F_previous + F_stage, anchored at the newest parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from invcoss_jax.continual.params import merge_params, split_params
from invcoss_jax.continual.step import mae_forward, num_patches
from invcoss_jax.measure import features


def empirical_fisher(model, params, batches: Iterable, *, mask_ratio: float, rng: jax.Array,
                     num_examples: int = -1, batch_size: int = 8,
                     masker: Callable[[dict, np.random.Generator], dict] | None = None) -> tuple[Any, int]:
  """(Fisher diagonal as a float32 NumPy tree like the encoder side of `params`, examples used).

  `batches` yields image arrays or dicts with 'image' (the stage's eval iterator), or text batches (dicts
  with 'tokens', 'attention_mask', 'word_ids'), whose loss is the MLM loss under the whole-word masks
  `masker` draws (train.mlm.masker_for; seeded by the index of the chunk's first example). `num_examples`
  <= 0 uses all of them. The per-example mask noise of images is fold_in(rng, example index)."""
  enc, dec = split_params(params)

  def one_loss(e, x, noise):
    if isinstance(x, dict):  # one text example: the MLM loss of its corrupted tokens
      out = model.apply({"params": merge_params(e, dec)}, x["tokens"][None], x["attention_mask"][None],
                        x["mlm_mask"][None], x["labels"][None], train=False, method=type(model).mlm)
      return out["loss"]
    loss, _ = mae_forward(model, merge_params(e, dec), x[None], noise[None], mask_ratio=mask_ratio, train=False)
    return loss

  @jax.jit
  def sum_sq_grads(e, x, noise, w):
    g = jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0))(e, x, noise)
    return jax.tree.map(lambda t: jnp.einsum("b,b...->...", w, jnp.square(t.astype(jnp.float32))), g)

  total, used = None, 0
  limit = int(num_examples) if int(num_examples) > 0 else None

  def flush(chunk: dict):
    nonlocal total, used
    n = _rows(chunk)
    w = features.row_weights(n, batch_size)  # padded rows carry weight 0
    chunk = {k: features.pad_rows(v, batch_size) for k, v in chunk.items()}
    if "image" in chunk:
      x = chunk["image"]
      l = num_patches(model.cfg, x.shape[1:])
      noise = jnp.stack([jax.random.uniform(jax.random.fold_in(rng, used + i), (l,)) for i in range(batch_size)])
    else:
      if masker is None:
        raise ValueError("EWC on text needs the stage's MLM masker (train.mlm.masker_for)")
      seed = int(jax.device_get(jax.random.randint(jax.random.fold_in(rng, used), (), 0, 2 ** 31 - 1)))
      x = {k: np.asarray(v, np.int32) for k, v in masker(chunk, np.random.default_rng(seed)).items()}
      noise = jnp.zeros((batch_size, 0))
    s = jax.device_get(sum_sq_grads(enc, x, noise, w))
    total = s if total is None else jax.tree.map(np.add, total, s)
    used += n

  pending: dict[str, np.ndarray] | None = None
  for batch in batches:
    part = _examples(batch)
    if limit is not None:
      keep = max(0, limit - used - (_rows(pending) if pending else 0))
      part = {k: v[:keep] for k, v in part.items()}
    pending = part if pending is None else {k: np.concatenate([pending[k], part[k]]) for k in pending}
    while _rows(pending) >= batch_size:
      flush({k: v[:batch_size] for k, v in pending.items()})
      pending = {k: v[batch_size:] for k, v in pending.items()}
    if limit is not None and used + _rows(pending) >= limit:
      break
  if pending and _rows(pending):
    flush(pending)
  if total is None or used == 0:
    raise ValueError("EWC: the stage's data yielded no examples for the Fisher information")
  return jax.tree.map(lambda t: np.asarray(t, np.float32) / used, total), used


def _examples(batch) -> dict[str, np.ndarray]:
  """A batch as a dict of arrays: {'image'} for images, the text arrays for text."""
  if isinstance(batch, dict) and "tokens" in batch:
    return {k: np.asarray(batch[k]) for k in ("tokens", "attention_mask", "word_ids")}
  return {"image": np.asarray(batch["image"] if isinstance(batch, dict) else batch, np.float32)}


def _rows(chunk: dict[str, np.ndarray]) -> int:
  return int(next(iter(chunk.values())).shape[0])


def online_update(previous_fisher: Any | None, stage_fisher: Any, gamma: float) -> Any:
  """gamma * F_previous + F_stage (F_stage alone for the first stage)."""
  if previous_fisher is None:
    return stage_fisher
  return jax.tree.map(lambda a, b: np.asarray(gamma * a + b, np.float32), previous_fisher, stage_fisher)
