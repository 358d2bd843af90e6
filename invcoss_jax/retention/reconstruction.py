"""Masked-reconstruction retention measures: what a re-fitted probe on drifted features can hide.

- `fixed_noises`: masking noise (draws, N, L) of one (seed, stage): every method and every later stage is
  measured under the same masks of that stage's held-out images.
- `Reconstruction.error`: the MAE's own loss (masked-patch MSE, normalised pixels when config.model.norm_pix_loss)
  of a model on a set of images under fixed masks, averaged over the examples and the mask draws. Every
  example has the same number of masked tokens, so the mean of the per-example errors equals `MAE.__call__`'s
  loss of the whole set under the same noise.
- `Reconstruction.refit_decoder`: a freshly initialised decoder trained with Adam on a frozen encoder's tokens
  (the encoder side of the parameters is held fixed). A continual stage re-initialises the decoder
  (config.continual.reinit_decoder), so a later model's own decoder fits only the last stage; the error after
  a re-fit is robust to that and to drift, but still grows when the encoder lost the stage's information.

One `Reconstruction` holds the compiled functions of one model: the error of a batch and the re-fit step compile
once per input shape and serve every stage and method.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from invcoss_jax import models
from invcoss_jax.continual import params as params_lib
from invcoss_jax.continual.sequence import fresh_params_fn
from invcoss_jax.measure.features import pad_rows


def num_tokens(model_cfg: models.ViTConfig, example_shape) -> int:
  """Patch tokens (no CLS) of one image (H, W, C) or volume (D, H, W, C)."""
  rank = len(example_shape) - 1
  return int(np.prod(models.grid_shape(tuple(example_shape[:-1]), model_cfg.patch_size(rank))))


def fixed_noises(key: jax.Array, num_examples: int, tokens: int, draws: int) -> np.ndarray:
  """(draws, num_examples, tokens) uniform masking noise: MAE keeps each example's tokens of smallest noise."""
  return np.asarray(jax.random.uniform(key, (int(draws), int(num_examples), int(tokens))), np.float32)


class Reconstruction:
  """Compiled masked-reconstruction error and decoder re-fit of one MAE."""

  def __init__(self, model: models.MAE, *, mask_ratio: float, batch_size: int = 256, refit_batch_size: int = 64,
               refit_lr: float = 1e-3):
    if not 0.0 < float(mask_ratio) < 1.0:
      raise ValueError(f"reconstruction error: mask ratio {mask_ratio} must be in (0, 1)")
    self.model, self.mask_ratio = model, float(mask_ratio)
    self.batch_size, self.refit_batch_size = int(batch_size), int(refit_batch_size)
    self.tx = optax.adam(float(refit_lr))
    ratio, tx = self.mask_ratio, self.tx

    def per_example(params, images, noise):
      def fwd(m: models.MAE, x, n):
        grid = models.grid_shape(x.shape[1:-1], m.cfg.patch_size(models.spatial_rank(x)))
        tokens, mask, ids_restore = m.encode(x, mask_ratio=ratio, train=False, noise=n)
        pred = m.decode(tokens, ids_restore, grid, train=False)
        _, target = m.loss(x, pred, mask)  # the loss's own targets (normalised pixels as configured)
        return models.masked_mse(pred, target, mask, per_sample=True)
      return model.apply({"params": params}, images, noise, method=fwd)

    def step(decoder, opt_state, encoder, images, noise):
      def loss_fn(d):
        return model.apply({"params": params_lib.merge_params(encoder, d)}, images, mask_ratio=ratio,
                           train=False, noise=noise)["loss"]
      loss, grads = jax.value_and_grad(loss_fn)(decoder)
      updates, opt_state = tx.update(grads, opt_state, decoder)
      return optax.apply_updates(decoder, updates), opt_state, loss

    self._per_example = jax.jit(per_example)
    self._step = jax.jit(step)
    self._init = jax.jit(tx.init)

  def errors(self, params, images: np.ndarray, noises: np.ndarray) -> np.ndarray:
    """(draws, N) masked-reconstruction error of every example under every draw of `noises` (draws, N, L)."""
    images, noises = np.asarray(images, np.float32), np.asarray(noises, np.float32)
    if noises.ndim != 3 or noises.shape[1] != len(images) or len(images) == 0:
      raise ValueError(f"reconstruction error: expected noise (draws, {len(images)}, tokens) for "
                       f"{len(images)} images, got {noises.shape}")
    size = min(self.batch_size, len(images))
    out = np.zeros(noises.shape[:2], np.float32)
    for d in range(noises.shape[0]):
      for i in range(0, len(images), size):
        x, n = images[i:i + size], noises[d, i:i + size]
        e = self._per_example(params, pad_rows(x, size), pad_rows(n, size))
        out[d, i:i + len(x)] = np.asarray(jax.device_get(e))[:len(x)]
    return out

  def error(self, params, images: np.ndarray, noises: np.ndarray) -> float:
    """The mean masked-reconstruction error over the examples and mask draws."""
    return float(np.mean(self.errors(params, images, noises), dtype=np.float64))

  def refit_decoder(self, params, fresh_decoder, images: np.ndarray, *, steps: int, key: jax.Array,
                    seed: int) -> tuple[Any, list[float]]:
    """(params with the encoder side of `params` and `fresh_decoder` trained for `steps` Adam steps on
    `images`, the training losses). Batches of `refit_batch_size` examples are drawn by numpy from `seed`
    (with replacement only when there are fewer images), masks from `key` folded with the step: the same
    arguments give the same decoder."""
    images = np.asarray(images, np.float32)
    if len(images) == 0:
      raise ValueError("decoder re-fit: no images")
    encoder, _ = params_lib.split_params(params)
    decoder = fresh_decoder
    opt_state = self._init(decoder)
    rng = np.random.default_rng(seed)
    tokens = num_tokens(self.model.cfg, images.shape[1:])
    b = self.refit_batch_size
    losses = []
    for t in range(int(steps)):
      idx = rng.choice(len(images), size=b, replace=len(images) < b)
      noise = jax.random.uniform(jax.random.fold_in(key, t), (b, tokens))
      decoder, opt_state, loss = self._step(decoder, opt_state, encoder, images[idx], noise)
      losses.append(loss)
    return params_lib.merge_params(encoder, decoder), [float(v) for v in jax.device_get(losses)]


def fresh_decoder(model_cfg: models.ViTConfig, key: jax.Array) -> dict:
  """The decoder side (decoder blocks, pixel heads, mask token; the MLM head) of a new initialisation,
  as a continual stage with config.continual.reinit_decoder starts it."""
  return params_lib.split_params(fresh_params_fn(model_cfg)(key))[1]
