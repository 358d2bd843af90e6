"""The frozen encoder's features and the batching around them, one copy for every caller.

- `pooled_feature`: the feature of each example from the encoder output (B, 1 + L, D): 'mean' of the patch
  tokens, 'cls', or MedCoSS's 'all_tokens'; k-means buffers, the inversion's L_rep, the audit and the retention
  probes all pool with it.
- `feature_fn`: the one compiled (params, inputs) -> (B, D) feature function per (model, kind, normalize),
  cached, so stages, seeds and image sets share its compilations.
- `pad_rows` / `pad_batch`: a ragged last batch padded to the compiled size by repeating its last row (with
  0/1 weights marking the real rows, for reductions over the batch); `batched`: a per-row function over
  fixed-size padded batches. Padding changes no real row: every function run this way treats rows
  independently (or, for reductions, weighs the padded rows 0).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

FEATURES = ("all_tokens", "mean", "cls")


def pooled_feature(tokens: jax.Array, kind: str, valid: jax.Array | None = None, *,
                   option: str = "config.continual.kmeans.feature") -> jax.Array:
  """(B, D) float32 feature of each example from the encoder output `tokens` (B, 1 + L, D).

  'mean': the mean patch token (CLS excluded: an MAE never trains its CLS token directly); 'cls': the CLS
  token; 'all_tokens': the mean over every token, CLS included (MedCoSS: feature.mean(1)). `valid` (B, 1 + L),
  for text: only its tokens (CLS and the real tokens, no padding) enter the means. `option` names the setting
  in the error for an unknown kind."""
  if kind not in FEATURES:
    raise ValueError(f"{option} must be one of {list(FEATURES)}, got {kind!r}")
  t = tokens.astype(jnp.float32)
  if kind == "cls":
    return t[:, 0]
  if kind == "mean":
    t = t[:, 1:]
    valid = None if valid is None else valid[:, 1:]
  if valid is None:
    return jnp.mean(t, axis=1)
  w = valid.astype(jnp.float32)
  return jnp.einsum("bl,bld->bd", w, t) / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)


def feature_fn(model, kind: str = "mean", normalize: bool = False, *,
               option: str = "config.continual.kmeans.feature") -> Callable:
  """(params, inputs) -> (B, D) float32 encoder features at mask ratio 0 (eval mode) of images, or of (B, L)
  integer token ids (their padding, config.model.pad_id, left out of the means); with `normalize`, each row
  scaled to unit L2 norm. One compiled function per (model, kind, normalize)."""
  if kind not in FEATURES:
    raise ValueError(f"{option} must be one of {list(FEATURES)}, got {kind!r}")
  return _feature_fn(model, kind, bool(normalize))


@functools.lru_cache(maxsize=16)
def _feature_fn(model, kind: str, normalize: bool):

  @jax.jit
  def feats(params, x):
    tokens, _, _ = model.apply({"params": params}, x, mask_ratio=0.0, train=False, method=type(model).encode)
    valid = None
    if jnp.issubdtype(x.dtype, jnp.integer):  # text: padding (config.model.pad_id) is not part of the feature
      real = (x != model.cfg.pad_id).astype(jnp.float32)
      valid = jnp.concatenate([jnp.ones((x.shape[0], 1), jnp.float32), real], axis=1)
    f = pooled_feature(tokens, kind, valid)
    if normalize:
      f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    return f

  return feats


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """`x` with its last row repeated up to `rows` rows (one compiled shape for a ragged last batch)."""
  n = x.shape[0]
  if n >= rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)], axis=0)


def row_weights(n: int, rows: int) -> np.ndarray:
  """float32 weights (rows,) of a batch of `n` real rows padded to `rows`: 1 for the real rows, 0 after."""
  weights = np.zeros((rows,), np.float32)
  weights[:n] = 1.0
  return weights


def pad_batch(x: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
  """(`pad_rows(x, rows)`, `row_weights`): reductions over the batch weigh the padded rows 0."""
  return pad_rows(x, rows), row_weights(x.shape[0], rows)


def batched(fn: Callable, params, inputs: np.ndarray, batch_size: int, *extra: np.ndarray) -> np.ndarray:
  """fn(params, inputs[, extra...]) over fixed-size batches of `batch_size` rows (the last one padded), the
  real rows concatenated on the host. `fn` must treat rows independently."""
  out = []
  for start in range(0, len(inputs), batch_size):
    n = len(inputs[start:start + batch_size])
    args = [pad_rows(a[start:start + batch_size], batch_size) for a in (inputs, *extra)]
    out.append(np.asarray(jax.device_get(fn(params, *args)))[:n])
  return np.concatenate(out)


def model_inputs(batch) -> np.ndarray:
  """The encoder input of a batch: images (float32), or the token ids (int32) of a text batch ('tokens', or a
  2-D integer array)."""
  if isinstance(batch, dict) and "tokens" in batch:
    return np.asarray(batch["tokens"], np.int32)
  x = batch["image"] if isinstance(batch, dict) else batch
  x = np.asarray(x)
  return x.astype(np.int32) if np.issubdtype(x.dtype, np.integer) and x.ndim == 2 else x.astype(np.float32)


def encoder_features(model, params, batches: Iterable, *, kind: str, normalize: bool = False,
                     option: str = "config.continual.kmeans.feature") -> np.ndarray:
  """(N, D) float32 features of every example of `batches` (images, or text batches with 'tokens'; eval mode,
  no masking), in order, through `feature_fn`. Ragged batches are padded to the first batch's size so one
  compiled function serves every batch."""
  feats = feature_fn(model, kind, normalize, option=option)
  out, size = [], None
  for batch in batches:
    x = model_inputs(batch)
    n = x.shape[0]
    if n == 0:
      continue
    size = size or n
    out.append(np.asarray(jax.device_get(feats(params, pad_rows(x, size))))[:n])
  if not out:
    raise ValueError("encoder features: the data yielded no examples")
  return np.concatenate(out).astype(np.float32)
