"""The inversion objective (paper Eq. 6): pure loss functions and a registry of named terms.

Each loss is a pure function of arrays (float32 result) that can be read, tested and swapped on its own.
The objective is `sum(spec.loss_weights[name] * term(ctx, spec))` over the registered terms named in
`config.inversion.loss_weights`; a weight of 0 switches a term off (it is not even computed). `spec` is the
`ProgramSpec` of config.inversion (inversion/config.py): the options the compiled program depends on, and the
only ones a term reads. A new term is a function registered with `@register_loss_term('name')` plus a
`loss_weights.name` entry, and options of its own are declared there (`options=(...)`); see
docs/extending_losses.md. `ctx` is an `inversion.context.InversionContext`: the synthetic images and, computed
lazily on first use, everything the frozen model says about them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from invcoss_jax.inversion.config import ProgramSpec, declare_term_options, program_spec
from invcoss_jax.inversion.statistics import pca_pool_shape, pooled_grey
from invcoss_jax.models.vit_mae import masked_mse

LossTerm = Callable[[Any, ProgramSpec], jax.Array]
_LOSS_TERMS: dict[str, LossTerm] = {}


def register_loss_term(name: str, *, options: Iterable[str] = ()) -> Callable[[LossTerm], LossTerm]:
  """Decorator: registers `fn(ctx, spec) -> scalar` as the loss term `name` of the objective.

  `options`: keys of config.inversion that the term reads (`spec.<option>`), beyond the built-in ones; they
  are program options of the spec (a change recompiles), and config.inversion refuses any key nobody declared."""
  options = tuple(str(o) for o in options)

  def register(fn: LossTerm) -> LossTerm:
    if name in _LOSS_TERMS and _LOSS_TERMS[name] is not fn:
      raise ValueError(f"loss term {name!r} is already registered (by {_LOSS_TERMS[name].__module__}."
                       f"{_LOSS_TERMS[name].__qualname__}); pick another name")
    declare_term_options(name, options)
    _LOSS_TERMS[name] = fn
    return fn
  return register


def registered_loss_terms() -> tuple[str, ...]:
  return tuple(sorted(_LOSS_TERMS))


def get_loss_term(name: str) -> LossTerm:
  if name not in _LOSS_TERMS:
    raise ValueError(f"config.inversion.loss_weights names the loss term {name!r}, which is not registered; "
                     f"registered terms: {list(registered_loss_terms())} (register one with "
                     "@invcoss_jax.inversion.losses.register_loss_term)")
  return _LOSS_TERMS[name]


def active_terms(spec) -> dict[str, float]:
  """{name: weight} of the terms with a non-zero weight, checked against the registry (`spec`: a ProgramSpec,
  or config.inversion)."""
  weights = {}
  for name, w in program_spec(spec).loss_weights:
    get_loss_term(name)
    if not math.isfinite(w):
      raise ValueError(f"config.inversion.loss_weights.{name} must be a finite number, got {w}")
    if w != 0.0:
      weights[name] = w
  if not weights:
    raise ValueError("config.inversion.loss_weights switches every term off; at least one weight must be non-zero")
  return weights


def objective(ctx, spec) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(total, {name: unweighted term value}) of Eq. 6 over the active terms (`spec`: the ProgramSpec, or
  config.inversion)."""
  spec = program_spec(spec)
  total = jnp.zeros((), jnp.float32)
  values = {}
  for name, w in active_terms(spec).items():
    v = jnp.asarray(get_loss_term(name)(ctx, spec))
    if v.shape != ():
      raise ValueError(f"loss term {name!r} must return a scalar, got shape {v.shape}")
    v = v.astype(jnp.float32)
    values[name] = v
    total = total + w * v
  return total, values


# ----------------------------------------------------------------------------------------------------------
# Pure losses.


def _norm(x: jax.Array) -> jax.Array:
  """Plain L2 norm of the whole array with a zero (not NaN) gradient at 0."""
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)))
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def l_norm(mean: jax.Array, var: jax.Array, target_mean: jax.Array, target_var: jax.Array) -> jax.Array:
  """Eq. 3: sum over blocks l of ||mu_l - E[mu_l]||_2 + ||var_l - E[var_l]||_2 (plain, not squared, norms).

  Inputs are `(num_blocks, 1 + L, D)`: the synthetic batch's per-block token mean and biased variance over
  the batch axis, and the stored statistics of the real data. Each block's norm is over all its tokens and
  channels, as DeepInversion's per-BN-layer norm is over channels.
  """
  if mean.shape != target_mean.shape or var.shape != target_var.shape:
    raise ValueError(f"l_norm: synthetic statistics {mean.shape} do not match the stored ones "
                     f"{target_mean.shape}: the images must have the stage's input shape")
  per_block = jax.vmap(_norm)(mean - target_mean) + jax.vmap(_norm)(var - target_var)
  return jnp.sum(per_block)


def l_task(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Eq. 7: the MAE's masked reconstruction error through the frozen model.

  `pred`, `target` `(B, L, P)` (target = the possibly per-patch-normalised pixels the model was trained to
  predict), `mask` `(B, L)` with 1 = masked. Reduced as in pre-training: mean over each patch's pixels, mean
  over the masked patches.
  """
  return masked_mse(pred, target, mask)


def l_img(images: jax.Array, reduction: str = "mean") -> jax.Array:
  """Eq. 8: anisotropic total variation over the spatial axes (H, W in 2D; D, H, W in 3D).

  `images` is channels-last `(B, H, W, C)` or `(B, D, H, W, C)`. reduction 'sum' is Eq. 8 as printed (sum of
  |neighbour differences| over every pixel and channel of an image, averaged over the batch); 'mean' sums over
  the axes the mean absolute difference (CMI/DeepInversion's scale), which keeps alpha_img meaningful at any
  image size.
  """
  if images.ndim not in (4, 5):
    raise ValueError(f"l_img expects (B,H,W,C) or (B,D,H,W,C), got shape {images.shape}")
  if reduction not in ("mean", "sum"):
    raise ValueError(f"config.inversion.img_reduction must be 'mean' or 'sum', got {reduction!r}")
  x = images.astype(jnp.float32)
  total = jnp.zeros((), jnp.float32)
  for axis in range(1, x.ndim - 1):
    d = jnp.abs(jnp.diff(x, axis=axis))
    total = total + (jnp.mean(d) if reduction == "mean" else jnp.sum(d) / x.shape[0])
  return total


def _unit(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def l_rep(features: jax.Array, pool: jax.Array, pool_valid: jax.Array) -> jax.Array:
  """Eq. 5: mean over the batch and the valid pool entries of the squared cosine similarity.

  `features` `(B, F)` of the synthetic batch (from the frozen encoder), `pool` `(P, F)`, `pool_valid` `(P,)`
  (1 = a filled slot). 0 while the pool is empty.
  """
  cos = _unit(features) @ _unit(pool).T  # (B, P)
  valid = pool_valid.astype(jnp.float32)
  n = features.shape[0] * jnp.sum(valid)
  return jnp.sum(jnp.square(cos) * valid[None, :]) / jnp.maximum(n, 1.0)


def mean_pairwise_cosine(features: jax.Array) -> jax.Array:
  """Mean cosine similarity over distinct pairs of rows of `features` `(N, F)` (a diversity measure)."""
  u = _unit(features)
  n = features.shape[0]
  if n < 2:
    raise ValueError(f"mean_pairwise_cosine needs at least 2 features, got {n}")
  s = u @ u.T
  return (jnp.sum(s) - jnp.trace(s)) / (n * (n - 1))


# ----------------------------------------------------------------------------------------------------------
# The paper's terms (Eq. 6), as registered terms of the objective.


@register_loss_term("norm")
def norm_term(ctx, spec) -> jax.Array:
  """alpha_norm * L_norm: synthetic per-block token statistics vs the stage's stored statistics."""
  m = ctx.feature_moments
  return l_norm(m.mean, m.var, ctx.target_stats.mean, ctx.target_stats.var)


@register_loss_term("task")
def task_term(ctx, spec) -> jax.Array:
  """L_task: MAE reconstruction of the synthetic images at config.inversion.task_mask_ratio."""
  out = ctx.mae_outputs
  return l_task(out["pred"], out["target"], out["mask"])


@register_loss_term("img")
def img_term(ctx, spec) -> jax.Array:
  """alpha_img * L_img: total variation of the synthetic images (config.inversion.img_reduction)."""
  return l_img(ctx.images, spec.img_reduction)


# ----------------------------------------------------------------------------------------------------------
# Priors beyond the paper (opt-in: weight 0 by default; docs/continual.md). They read the stage's input-space
# statistics (config.inversion.pixel_statistics), a few kilobytes kept beside Eq. 9's feature statistics.

PIXEL_TERMS = ("pixel", "tv_target", "pixel_pca")


def l_pixel(images: jax.Array, target_mean: jax.Array, target_var: jax.Array) -> jax.Array:
  """||mean_b x - mu||_2 + ||var_b x - sigma^2||_2 over every pixel and channel: L_norm's form applied to the
  input, as DeepInversion's first BatchNorm layer (whose statistics are per channel of the pixels) and weighted
  apart. Per-position block statistics fix the layout of the batch's feature moments; this fixes the batch's
  mean image and where it varies (the real X-rays vary little over the mediastinum, much at the lung edges)."""
  x = images.astype(jnp.float32)
  if x.shape[1:] != target_mean.shape:
    raise ValueError(f"pixel statistics of shape {target_mean.shape} do not fit images of shape {x.shape[1:]}")
  mean = jnp.mean(x, axis=0)
  var = jnp.mean(jnp.square(x - mean), axis=0)
  return _norm(mean - target_mean) + _norm(var - target_var)


def l_tv_target(images: jax.Array, target_tv: jax.Array) -> jax.Array:
  """|TV(x) - tau|: the batch's mean total variation pulled towards the real images' (PSAQ-ViT pulls TV
  towards a target rather than minimising it: minimising TV rewards flat fields, which inpaint easily)."""
  return jnp.abs(l_img(images, "mean") - jnp.asarray(target_tv, jnp.float32))


def l_pixel_pca(images: jax.Array, pooled_shape: tuple[int, ...], mean: jax.Array, basis: jax.Array,
                var: jax.Array, residual: jax.Array, *, full: int = 32, residual_weight: float = 1.0,
                eps: float = 1e-4) -> jax.Array:
  """The Gaussian KL of the batch's whitened coordinates in the stored principal subspace against N(0, I),
  plus `residual_weight` times the one-dimensional Gaussian KL of its energy outside the subspace.

  The grey images are pooled to `pooled_shape` (statistics.pooled_grey), centred on the stored mean `mean`
  (D,), projected on the K orthonormal rows of `basis` (K, D) and divided by the square roots of their variances
  `var` (K,): a set distributed as the real images has identity covariance there. The leading `full`
  components are fitted with their full covariance, 0.5 (tr S + |m|^2 - f - log det(S + eps I)) (`m`, `S`: the
  batch mean and biased covariance; a batch of <= f images is singular, hence eps), the others one by one,
  0.5 sum_k (s_k + m_k^2 - 1 - log s_k), which needs no more images than components. `r`: the batch's mean
  squared residual outside the subspace over the stored one (`residual`), scored 0.5 (r - 1 - log r). Where
  the per-pixel moments (`l_pixel`) say how much each pixel varies, this says along which image-wide
  directions: a batch of independent texture with the right per-pixel variance has little variance along
  the leading components and too much energy outside them."""
  g = pooled_grey(images.astype(jnp.float32), pooled_shape) - mean
  if g.shape[1] != basis.shape[1]:
    raise ValueError(f"principal subspace of {basis.shape[1]} values does not fit images pooled to {pooled_shape}")
  k = basis.shape[0]
  f = min(int(full), k)
  proj = g @ basis.T  # (B, K)
  z = proj / jnp.sqrt(jnp.maximum(var, 1e-12))
  m = jnp.mean(z, axis=0)
  zc = z - m
  kl = jnp.zeros((), jnp.float32)
  if f > 0:
    cov = zc[:, :f].T @ zc[:, :f] / z.shape[0]
    _, logdet = jnp.linalg.slogdet(cov + eps * jnp.eye(f, dtype=cov.dtype))
    kl = kl + 0.5 * (jnp.trace(cov) + jnp.sum(jnp.square(m[:f])) - f - logdet)
  if f < k:
    s = jnp.mean(jnp.square(zc[:, f:]), axis=0) + eps
    kl = kl + 0.5 * jnp.sum(s + jnp.square(m[f:]) - 1.0 - jnp.log(s))
  resid = g - proj @ basis
  r = jnp.mean(jnp.sum(jnp.square(resid), axis=1)) / jnp.maximum(residual, 1e-12)
  return kl + residual_weight * 0.5 * (r - 1.0 - jnp.log(jnp.maximum(r, 1e-12)))


@register_loss_term("pixel_pca")
def pixel_pca_term(ctx, spec) -> jax.Array:
  """The batch's distribution in the stage's principal subspace of grey images (opt-in; needs
  config.inversion.pixel_components > 0 when the statistics were kept)."""
  p = ctx.target_stats.pixel
  shape = pca_pool_shape(ctx.images.shape[1:-1], spec.pixel_components_grid)
  return l_pixel_pca(ctx.images, shape, p["pca_mean"], p["pca_basis"], p["pca_var"], p["pca_residual"],
                     full=spec.pixel_pca_full, residual_weight=spec.pixel_pca_residual_weight)


@register_loss_term("pixel")
def pixel_term(ctx, spec) -> jax.Array:
  """Batch moments of the pixels vs the stage's pixel statistics (opt-in)."""
  p = ctx.target_stats.pixel
  return l_pixel(ctx.images, p["mean"], p["var"])


@register_loss_term("tv_target")
def tv_target_term(ctx, spec) -> jax.Array:
  """Total variation towards the real images' (opt-in; use with loss_weights.img = 0)."""
  return l_tv_target(ctx.images, ctx.target_stats.pixel["tv"])


@register_loss_term("rep")
def rep_term(ctx, spec) -> jax.Array:
  """alpha_rep * L_rep: repulsion from the persistent feature pool (current batch included, Sec. 3.4)."""
  pool, valid = ctx.pool_with_batch
  return l_rep(ctx.features, pool, valid)
