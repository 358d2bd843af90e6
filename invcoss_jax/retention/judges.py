"""Independent judges of a synthetic replay set: how close is a set of images to held-out real images?

An inverted replay set is produced from the model it later trains, so measuring it with that model's own
features is circular. These judges never saw the inverted model: they are fitted from scratch on the two sets
being compared (classifier two-sample tests), are fixed pixel statistics, or live in the feature space of a
small CNN trained on another objective (`train_judge_features`). Every function is pure and works on NumPy
arrays of images `(N, H, W, C)` channels-last (grey X-rays replicated to C channels, values in [0, 1]); 3D
volumes `(N, D, H, W, C)` are judged on their central slice along D (`to_grey`).

- Classifier two-sample tests (C2ST, Lopez-Paz & Oquab 2017): a classifier learns to tell set `a` (label 0)
  from set `b` (label 1) under stratified k-fold cross-validation; the ROC AUC of its out-of-fold
  probabilities is 0.5 when it cannot tell them apart and 1 when it always can. Three classifiers see
  different things: `c2st_logistic` (linear in pixels: mean images, linear structure), `c2st_statistics`
  (gradient boosting on `pixel_statistic_features`: intensity histogram, texture, spectrum, profiles) and
  `c2st_cnn` (a small CNN trained from scratch: local structure).
- `pixel_statistics`: correlation of the per-pixel mean and std maps, 1D Wasserstein distance of the intensity
  histograms, distance of the radial log power spectra, total variation.
- `kid` (Bińkowski et al. 2018) and `prdc` (precision, recall, density, coverage; Naeem et al. 2020) in a
  feature space, e.g. `JudgeNet.features`.
- `smoothed_noise_like`: the "smoothed noise" anchor, Gaussian noise blurred and matched per image to the mean
  and std of real images; `judge_with_anchors` judges a candidate next to real-vs-real, smoothed noise and an
  (optional) untrained generator so the numbers have a floor and a ceiling.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import scipy.ndimage
import scipy.stats

from invcoss_jax.retention.metrics import _check_features  # pylint: disable=protected-access
from invcoss_jax.audit.spectrum import radial_profile

SPECTRUM_BINS = 8
QUANTILES = (5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0)


# ----------------------------------------------------------------------------------------------- inputs


def _check_images(name: str, x: np.ndarray, min_count: int = 1) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim not in (4, 5):
    raise ValueError(f"{name}: expected images (N, H, W, C) or volumes (N, D, H, W, C), got shape {x.shape}")
  if x.shape[0] < min_count:
    raise ValueError(f"{name}: expected at least {min_count} images, got {x.shape[0]}")
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise ValueError(f"{name}: expected real-valued pixels, got dtype {x.dtype}")
  if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: the images hold NaN or Inf")
  return x


def to_grey(x: np.ndarray, name: str = "images") -> np.ndarray:
  """(N, H, W) float64 grey images: the mean over channels of `x` (N, H, W, C).

  X-rays are stored grey with the channel replicated, so the mean is the image itself. Volumes (N, D, H, W, C)
  are judged on their central slice along D (index D // 2): the judges are 2D, and the central slice is the
  one slice every volume of a stage has in the same place."""
  x = _check_images(name, x)
  if x.ndim == 5:
    x = x[:, x.shape[1] // 2]
  if x.shape[1] < 2 or x.shape[2] < 2:
    raise ValueError(f"{name}: expected images of at least 2 x 2 pixels, got shape {x.shape}")
  return np.asarray(x, np.float64).mean(axis=-1)


def _check_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray]:
  ga, gb = to_grey(a, names[0]), to_grey(b, names[1])
  if ga.shape[1:] != gb.shape[1:]:
    raise ValueError(f"{names[0]} and {names[1]}: image sizes differ ({ga.shape[1:]} vs {gb.shape[1:]}); expected "
                     "the same spatial shape")
  return ga, gb


# ------------------------------------------------------------------------- classifier two-sample tests


def _two_sample_design(ga: np.ndarray, gb: np.ndarray, folds: int, seed: int
                       ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
  """Balanced pooled grey images (2n, H, W), labels (0 = a, 1 = b) and the stratified k-fold splits.

  The larger set is subsampled (without replacement, sorted indices) to the size of the smaller one, so that
  an AUC of 0.5 means chance whatever the sizes."""
  from sklearn.model_selection import StratifiedKFold
  if int(folds) != folds or folds < 2:
    raise ValueError(f"folds: expected an integer >= 2, got {folds}")
  rng = np.random.default_rng(seed)
  n = min(len(ga), len(gb))
  if n < folds:
    raise ValueError(f"a and b: the smaller set has {n} images, fewer than folds={folds}; expected at least one "
                     "image of each set per fold")
  if len(ga) > n:
    ga = ga[np.sort(rng.choice(len(ga), n, replace=False))]
  if len(gb) > n:
    gb = gb[np.sort(rng.choice(len(gb), n, replace=False))]
  x = np.concatenate([ga, gb])
  y = np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64)])
  splits = list(StratifiedKFold(n_splits=int(folds), shuffle=True, random_state=seed).split(x.reshape(2 * n, -1), y))
  return x, y, splits


def _oof_auc(y: np.ndarray, scores: np.ndarray) -> float:
  from sklearn.metrics import roc_auc_score
  return float(roc_auc_score(y, scores))


def c2st_logistic(a: np.ndarray, b: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
  """Out-of-fold ROC AUC of a logistic regression telling `b` (label 1) from `a` (label 0) on raw pixels.

  Flattened grey pixels, standardised on the training fold (StandardScaler), L2-penalised logistic regression
  (C = 1, L-BFGS, 2000 iterations), stratified k-fold (shuffled with `seed`); AUC > 0.5 means `b` scores
  higher. A linear judge sees differences of the mean image and of linear structure: it is blind to texture
  and to anything that changes only the pixel (co)variances."""
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  ga, gb = _check_pair(a, b)
  x, y, splits = _two_sample_design(ga, gb, folds, seed)
  x = x.reshape(len(x), -1)
  scores = np.zeros(len(x), np.float64)
  for train, test in splits:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    with warnings.catch_warnings():  # Separable sets stop early; the AUC is what is judged.
      warnings.simplefilter("ignore", ConvergenceWarning)
      model.fit(x[train], y[train])
    scores[test] = model.predict_proba(x[test])[:, 1]
  return _oof_auc(y, scores)


def radial_power_spectrum(x: np.ndarray, bins: int = SPECTRUM_BINS) -> np.ndarray:
  """(N, bins) float64: log of the mean power of each grey image's mean-removed spectrum in `bins` radial shells.

  The shells split the normalised radius (0, 1] (1 = Nyquist along an axis; the grid's corners beyond it are
  left out so each shell is complete), as `invcoss_jax.audit.spectrum.radial_profile`. The slope of this
  profile tells smooth images (power falling with frequency) from white noise (flat)."""
  if int(bins) != bins or bins < 1:
    raise ValueError(f"bins: expected an integer >= 1, got {bins}")
  g = to_grey(x)
  _, profile = radial_profile(g[..., None], num_bins=int(bins))
  if np.isnan(profile).any():
    raise ValueError(f"bins: {bins} radial shells are finer than the frequency grid of {g.shape[1:]} images; "
                     "expected fewer bins")
  return np.log(profile + 1e-12)


def _gradients(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return np.diff(g, axis=2), np.diff(g, axis=1)  # dx along W (N, H, W-1), dy along H (N, H-1, W)


def total_variation(x: np.ndarray) -> np.ndarray:
  """(N,) isotropic total variation per pixel, mean of sqrt(dx^2 + dy^2) of the grey images (forward
  differences on the (H-1, W-1) grid where both exist): high for noise, low for smooth images."""
  dx, dy = _gradients(to_grey(x))
  return np.sqrt(dx[:, :-1, :] ** 2 + dy[:, :, :-1] ** 2).mean(axis=(1, 2))


def pixel_statistic_features(x: np.ndarray, *, bins: int = SPECTRUM_BINS) -> np.ndarray:
  """(N, F) float64 hand-made statistics of each grey image, F = 7 + 2 + 3 + 1 + bins + H + W.

  Intensity quantiles (5, 10, 25, 50, 75, 90, 95 %), mean and std (the histogram); mean |dx|, mean |dy| and the
  mean squared gradient (texture, sharpness); isotropic total variation; the radial log power spectrum
  (`radial_power_spectrum`, scale of structure); the row and column mean profiles (coarse anatomy layout).
  These are what a pixel-linear judge misses: a set can match the mean image and the per-pixel variances of
  the real images and still differ in every one of them."""
  g = to_grey(x)
  n = len(g)
  flat = g.reshape(n, -1)
  quantiles = np.percentile(flat, QUANTILES, axis=1).T
  dx, dy = _gradients(g)
  grad = np.stack([np.abs(dx).mean(axis=(1, 2)), np.abs(dy).mean(axis=(1, 2)),
                   (dx[:, :-1, :] ** 2 + dy[:, :, :-1] ** 2).mean(axis=(1, 2))], axis=1)
  tv = np.sqrt(dx[:, :-1, :] ** 2 + dy[:, :, :-1] ** 2).mean(axis=(1, 2))
  return np.concatenate([quantiles, flat.mean(1, keepdims=True), flat.std(1, keepdims=True), grad, tv[:, None],
                         radial_power_spectrum(g[..., None], bins), g.mean(axis=2), g.mean(axis=1)], axis=1)


def c2st_statistics(a: np.ndarray, b: np.ndarray, *, folds: int = 5, seed: int = 0, max_iter: int = 100) -> float:
  """Out-of-fold ROC AUC of gradient boosting telling `b` (label 1) from `a` (label 0) on
  `pixel_statistic_features`.

  Same balanced stratified k-fold protocol as `c2st_logistic`; sklearn's HistGradientBoostingClassifier
  (`max_iter` trees, no early stopping, `random_state=seed`). Non-linear in the statistics, it catches sets
  whose histogram, texture or spectrum is off even when their mean image is right. The fits run on one
  OpenMP thread: on a few hundred examples threads cost more than they save, and on a busy machine OpenMP's
  spinning workers made a fit 60x slower in our runs."""
  import threadpoolctl
  from sklearn.ensemble import HistGradientBoostingClassifier
  ga, gb = _check_pair(a, b)
  x, y, splits = _two_sample_design(ga, gb, folds, seed)
  f = pixel_statistic_features(x[..., None])
  scores = np.zeros(len(f), np.float64)
  for train, test in splits:
    model = HistGradientBoostingClassifier(max_iter=int(max_iter), early_stopping=False, random_state=seed)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
      model.fit(f[train], y[train])
      scores[test] = model.predict_proba(f[test])[:, 1]
  return _oof_auc(y, scores)


# ------------------------------------------------------------------------------------------ small CNN


def _cnn_module(widths: tuple[int, ...], outputs: int):
  import flax.linen as nn

  class SmallCnn(nn.Module):
    """3x3 conv + ReLU per width, 2x2 mean pooling between them, global mean, dense `outputs`."""
    widths: tuple[int, ...]
    outputs: int

    @nn.compact
    def __call__(self, x, features_only: bool = False):
      for i, w in enumerate(self.widths):
        x = nn.relu(nn.Conv(w, (3, 3), padding="SAME")(x))
        if i < len(self.widths) - 1:
          n, h, ww, c = x.shape
          x = x[:, :h // 2 * 2, :ww // 2 * 2].reshape(n, h // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
      feats = x.mean(axis=(1, 2))
      if features_only:
        return feats
      return nn.Dense(self.outputs)(feats)

  return SmallCnn(widths, outputs)


@functools.lru_cache(maxsize=8)
def _cnn_model(widths: tuple[int, ...], outputs: int) -> tuple[Any, Callable, Callable]:
  """(model, jitted init, jitted apply) of one network configuration, compiled once per input shape."""
  import jax
  model = _cnn_module(widths, outputs)
  return model, jax.jit(model.init), jax.jit(model.apply, static_argnames=("features_only",))


@functools.lru_cache(maxsize=8)
def _cnn_train_step(widths: tuple[int, ...], outputs: int, lr: float) -> tuple[Callable, Any]:
  """(jitted Adam step, optimizer) of one network configuration and learning rate.

  The step takes the whole pooled image array and a batch of indices into it, so every fold (same pooled array,
  same batch size) reuses one compiled program. Steps run from Python: on XLA:CPU a `lax.scan` over
  convolution steps ran 25x slower than the same step dispatched per iteration."""
  import jax
  import jax.numpy as jnp
  import optax

  model, _, _ = _cnn_model(widths, outputs)
  tx = optax.adam(lr)

  def loss_fn(params, x, y):
    logits = model.apply(params, x)
    if outputs == 1:
      return optax.sigmoid_binary_cross_entropy(logits[:, 0], y.astype(jnp.float32)).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, opt_state, x_all, y_all, idx):
    grads = jax.grad(loss_fn)(params, x_all[idx], y_all[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step, tx


def _train_cnn(x_all: np.ndarray, y_all: np.ndarray, train_idx: np.ndarray, *, widths: tuple[int, ...], outputs: int,
               seed: int, fold: int, steps: int, batch_size: int, lr: float):
  """Params of a `_cnn_module` trained with Adam on the examples `train_idx` of `x_all` (N, H, W, 1) float32.

  Batches are drawn uniformly with replacement by a NumPy generator seeded with (seed, fold); weights start
  from `jax.random.fold_in(PRNGKey(seed), fold)`: the result depends on nothing else."""
  import jax
  import jax.numpy as jnp
  _, init, _ = _cnn_model(widths, outputs)
  step, tx = _cnn_train_step(widths, outputs, float(lr))
  params = init(jax.random.fold_in(jax.random.PRNGKey(seed), fold), jnp.zeros((1,) + x_all.shape[1:], jnp.float32))
  opt_state = tx.init(params)
  rng = np.random.default_rng([seed, fold])
  batches = train_idx[rng.integers(len(train_idx), size=(int(steps), int(batch_size)))].astype(np.int32)
  xd, yd = jnp.asarray(x_all, jnp.float32), jnp.asarray(y_all, jnp.int32)
  for i in range(int(steps)):
    params, opt_state = step(params, opt_state, xd, yd, batches[i])
  return params


def _apply_cnn(params, x: np.ndarray, *, widths: tuple[int, ...], outputs: int, features_only: bool = False,
               chunk: int = 256) -> np.ndarray:
  """The network on `x` (N, H, W, 1) float32 in chunks of at most `chunk`, zero-padded to a power of two: few
  compiled shapes whatever N (folds of different sizes, sets of any size)."""
  _, _, apply = _cnn_model(widths, outputs)
  size = min(int(chunk), 1 << max(len(x) - 1, 0).bit_length())
  out = []
  for i in range(0, len(x), size):
    part = x[i:i + size]
    n = len(part)
    if n < size:
      part = np.concatenate([part, np.zeros((size - n,) + part.shape[1:], part.dtype)])
    out.append(np.asarray(apply(params, part, features_only=features_only))[:n])
  return np.concatenate(out).astype(np.float64)


def _check_training(steps: int, batch_size: int, lr: float) -> None:
  if int(steps) != steps or steps < 1:
    raise ValueError(f"steps: expected an integer >= 1, got {steps}")
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
  if not lr > 0:
    raise ValueError(f"lr: expected a positive learning rate, got {lr}")


def c2st_cnn(a: np.ndarray, b: np.ndarray, *, folds: int = 5, seed: int = 0, steps: int = 300, batch_size: int = 64,
             lr: float = 1e-3, widths: Sequence[int] = (8, 16, 32)) -> float:
  """Out-of-fold ROC AUC of a small CNN trained from scratch to tell `b` (label 1) from `a` (label 0).

  Same balanced stratified k-fold protocol as `c2st_logistic`. Per fold, the grey images are standardised by
  the training fold's pixel mean and std, and a CNN (3x3 conv + ReLU of `widths` channels with 2x2 mean
  pooling between them, global mean, dense logit) is trained for `steps` Adam steps of `batch_size` images
  (binary cross-entropy, no augmentation). A CNN sees local structure that neither pixel-linear nor global
  statistics capture: edges, textures and artefacts of the inversion. Widths (8, 16, 32) keep 5 folds of
  300 steps (1500 steps of 64 images of 32 x 32) to about 16 s on two busy CPU cores, compile included;
  deterministic given `seed`."""
  _check_training(steps, batch_size, lr)
  ga, gb = _check_pair(a, b)
  x, y, splits = _two_sample_design(ga, gb, folds, seed)
  widths = tuple(int(w) for w in widths)
  scores = np.zeros(len(x), np.float64)
  for fold, (train, test) in enumerate(splits):
    mean, std = float(x[train].mean()), float(x[train].std())
    xs = ((x - mean) / max(std, 1e-8)).astype(np.float32)[..., None]
    params = _train_cnn(xs, y, train, widths=widths, outputs=1, seed=seed, fold=fold, steps=steps,
                        batch_size=batch_size, lr=lr)
    scores[test] = _apply_cnn(params, xs[test], widths=widths, outputs=1)[:, 0]
  return _oof_auc(y, scores)


@dataclasses.dataclass(frozen=True, eq=False)
class JudgeNet:
  """A small CNN trained supervised on another objective (e.g. normal vs pneumonia): its penultimate layer
  (global mean of the last conv block, `widths[-1]` values) is a feature space for `kid` and `prdc` that never
  saw the inverted model. Calling it returns the features."""
  params: Any
  widths: tuple[int, ...]
  classes: np.ndarray  # label value of each output unit
  mean: float  # pixel statistics of the training images, applied to every input
  std: float

  def _inputs(self, x: np.ndarray) -> np.ndarray:
    return ((to_grey(x) - self.mean) / self.std).astype(np.float32)[..., None]

  def features(self, x: np.ndarray) -> np.ndarray:
    """(N, widths[-1]) float64 penultimate features of images `x` (N, H, W, C)."""
    return _apply_cnn(self.params, self._inputs(x), widths=self.widths, outputs=len(self.classes),
                      features_only=True)

  __call__ = features

  def logits(self, x: np.ndarray) -> np.ndarray:
    """(N, num_classes) float64 class scores of images `x`."""
    return _apply_cnn(self.params, self._inputs(x), widths=self.widths, outputs=len(self.classes))

  def accuracy(self, x: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy on held-out images `x` with `labels` (N,): how much the feature space learnt."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(x):
      raise ValueError(f"labels: {len(labels)} labels for {len(x)} images; expected one label per image")
    return float(np.mean(self.classes[np.argmax(self.logits(x), axis=1)] == labels))


def train_judge_features(images: np.ndarray, labels: np.ndarray, *, seed: int = 0, steps: int = 1000,
                         batch_size: int = 64, lr: float = 1e-3, widths: Sequence[int] = (16, 32, 64)) -> JudgeNet:
  """A `JudgeNet` trained on `images` (N, H, W, C) with integer `labels` (N,) (softmax cross-entropy, Adam).

  Grey images standardised by their pixel mean and std; the same CNN family as `c2st_cnn`, a little wider;
  batches drawn uniformly with replacement. Train it on the stage's real training split: the features are then
  those of real data for a real task, independent of the inverted model. Deterministic given `seed`."""
  _check_training(steps, batch_size, lr)
  g = to_grey(images, "images")
  labels = np.asarray(labels).reshape(-1)
  if len(labels) != len(g):
    raise ValueError(f"labels: {len(labels)} labels for {len(g)} images; expected one label per image")
  classes, y = np.unique(labels, return_inverse=True)
  if len(classes) < 2:
    raise ValueError(f"labels: a single class {classes.tolist()}; expected at least two")
  mean, std = float(g.mean()), max(float(g.std()), 1e-8)
  xs = ((g - mean) / std).astype(np.float32)[..., None]
  widths = tuple(int(w) for w in widths)
  params = _train_cnn(xs, y, np.arange(len(xs)), widths=widths, outputs=len(classes), seed=seed, fold=0,
                      steps=steps, batch_size=batch_size, lr=lr)
  return JudgeNet(params=params, widths=widths, classes=classes, mean=mean, std=std)


# ------------------------------------------------------------------------------------ anchors, statistics


def smoothed_noise_like(real: np.ndarray, n: int, *, seed: int, sigma: float = 1.5) -> np.ndarray:
  """`n` images of Gaussian noise blurred by a Gaussian of `sigma` pixels, in the layout of `real`.

  Each image is standardised, then given the mean and std of a randomly drawn real image (its grey pixels; a
  whole volume for 3D) and clipped to the range of `real`; channels are replicated as in `real`, float32. This
  is the anchor a replay set must clearly beat: it has the right brightness, contrast and smoothness but no
  anatomy. The blur uses scipy's reflecting border, so the images are not periodic (like real ones, whose
  spectra carry the jump between opposite borders)."""
  real = _check_images("real", real)
  if int(n) != n or n < 1:
    raise ValueError(f"n: expected an integer >= 1, got {n}")
  if not sigma >= 0:
    raise ValueError(f"sigma: expected a blur width >= 0 pixels, got {sigma}")
  rng = np.random.default_rng(seed)
  spatial = real.shape[1:-1]
  noise = rng.standard_normal((int(n),) + spatial)
  noise = scipy.ndimage.gaussian_filter(noise, sigma=(0.0,) + (float(sigma),) * len(spatial))
  axes = tuple(range(1, noise.ndim))
  noise = (noise - noise.mean(axis=axes, keepdims=True)) / np.maximum(noise.std(axis=axes, keepdims=True), 1e-12)
  grey = np.asarray(real, np.float64).mean(axis=-1)
  pick = rng.integers(len(real), size=int(n))
  mean = grey.mean(axis=axes)[pick].reshape((-1,) + (1,) * len(spatial))
  std = grey.std(axis=axes)[pick].reshape((-1,) + (1,) * len(spatial))
  out = np.clip(noise * std + mean, float(grey.min()), float(grey.max()))
  return np.repeat(out[..., None], real.shape[-1], axis=-1).astype(np.float32)


def _corr(u: np.ndarray, v: np.ndarray) -> float:
  u, v = u.ravel() - u.mean(), v.ravel() - v.mean()
  norm = np.sqrt(np.sum(u * u) * np.sum(v * v))
  return float(np.sum(u * v) / norm) if norm > 0 else float("nan")


def pixel_statistics(x: np.ndarray, real: np.ndarray, *, bins: int = SPECTRUM_BINS, max_pixels: int = 200_000,
                     seed: int = 0) -> dict[str, float]:
  """Fixed pixel statistics of the grey images `x` against `real` (same H, W).

  - `mean_map_corr`, `std_map_corr`: Pearson correlation of the per-pixel mean (std) maps over the images
    (layout of the anatomy and of its variability; NaN if a map is constant);
  - `hist_w1`: 1D Wasserstein distance of the pooled pixel intensities (at most `max_pixels` of each, drawn
    with `seed`), in intensity units;
  - `spectrum_l2`: Euclidean distance of the mean radial log power spectra (`radial_power_spectrum`);
  - `tv`, `tv_real`: mean isotropic total variation (`total_variation`) of `x` and of `real`."""
  gx, gr = _check_pair(x, real, ("x", "real"))
  rng = np.random.default_rng(seed)

  def pixels(g: np.ndarray) -> np.ndarray:
    flat = g.reshape(-1)
    return flat[rng.choice(flat.size, max_pixels, replace=False)] if flat.size > max_pixels else flat

  return dict(
      mean_map_corr=_corr(gx.mean(0), gr.mean(0)),
      std_map_corr=_corr(gx.std(0), gr.std(0)),
      hist_w1=float(scipy.stats.wasserstein_distance(pixels(gx), pixels(gr))),
      spectrum_l2=float(np.linalg.norm(radial_power_spectrum(gx[..., None], bins).mean(0)
                                       - radial_power_spectrum(gr[..., None], bins).mean(0))),
      tv=float(total_variation(gx[..., None]).mean()),
      tv_real=float(total_variation(gr[..., None]).mean()))


# ----------------------------------------------------------------------------------- feature-space scores


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of two equal-size feature samples with the kernel k(a, b) = (a.b / d + 1)^3.

  As Bińkowski et al.'s reference code and torch-fidelity: the within-set sums leave out the diagonal,
  the cross term averages all m^2 pairs."""
  m, d = x.shape
  k_xx = (x @ x.T / d + 1.0) ** 3
  k_yy = (y @ y.T / d + 1.0) ** 3
  k_xy = (x @ y.T / d + 1.0) ** 3
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(f_x: np.ndarray, f_y: np.ndarray, *, num_subsets: int = 50, subset_size: int | None = None,
        seed: int = 0) -> dict[str, float]:
  """Kernel Inception Distance (Bińkowski et al. 2018) of features `f_x` (N, D) and `f_y` (M, D).

  `polynomial_mmd2_unbiased` on `num_subsets` pairs of random subsets (each drawn without replacement, sorted)
  of `subset_size` rows (default min(N, M, 1000), as torch-fidelity); returns their `mean` and `std` (ddof 0).
  Unbiased: about 0 (and can be slightly negative) for samples of one distribution, unlike FID it needs no
  Gaussian assumption and is fair to small sets."""
  f_x = _check_features("kid f_x", f_x, 2)
  f_y = _check_features("kid f_y", f_y, 2)
  if f_x.shape[1] != f_y.shape[1]:
    raise ValueError(f"kid: feature sizes differ ({f_x.shape[1]} vs {f_y.shape[1]}); expected the same feature space")
  if int(num_subsets) != num_subsets or num_subsets < 1:
    raise ValueError(f"num_subsets: expected an integer >= 1, got {num_subsets}")
  largest = min(len(f_x), len(f_y))
  m = min(largest, 1000) if subset_size is None else int(subset_size)
  if not 2 <= m <= largest:
    raise ValueError(f"subset_size: expected 2 <= subset_size <= min(N, M) = {largest}, got {subset_size}")
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(int(num_subsets)):
    ix = np.sort(rng.choice(len(f_x), m, replace=False))
    iy = np.sort(rng.choice(len(f_y), m, replace=False))
    values.append(polynomial_mmd2_unbiased(f_x[ix], f_y[iy]))
  return dict(mean=float(np.mean(values)), std=float(np.std(values)))


def prdc(real_f: np.ndarray, fake_f: np.ndarray, *, k: int = 5) -> dict[str, float]:
  """Precision, recall, density and coverage (Naeem et al. 2020) of `fake_f` against the reference `real_f`.

  Each point's manifold ball has the radius of its k-th nearest neighbour (itself left out) in its own set,
  Euclidean. precision: share of fakes inside some real ball; recall: share of reals inside some fake ball;
  density: real balls holding each fake, / k, averaged (1 for matching distributions, unbounded);
  coverage: share of real balls that hold at least one fake. Comparisons are strict, as in the `prdc`
  package. Precision/density measure fidelity, recall/coverage diversity (mode collapse lowers coverage)."""
  from sklearn.metrics import pairwise_distances
  real_f = _check_features("prdc real_f", real_f, 2)
  fake_f = _check_features("prdc fake_f", fake_f, 2)
  if real_f.shape[1] != fake_f.shape[1]:
    raise ValueError(f"prdc: feature sizes differ ({real_f.shape[1]} vs {fake_f.shape[1]}); expected the same "
                     "feature space")
  if int(k) != k or not 1 <= k < min(len(real_f), len(fake_f)):
    raise ValueError(f"k: expected an integer with 1 <= k < min(N_real, N_fake) = "
                     f"{min(len(real_f), len(fake_f))}, got {k}")
  k = int(k)

  def radii(f: np.ndarray) -> np.ndarray:
    return np.partition(pairwise_distances(f, f, metric="euclidean"), k, axis=1)[:, k]

  real_r, fake_r = radii(real_f), radii(fake_f)
  d = pairwise_distances(real_f, fake_f, metric="euclidean")  # (N_real, N_fake)
  inside = d < real_r[:, None]
  return dict(precision=float(inside.any(axis=0).mean()),
              recall=float((d < fake_r[None, :]).any(axis=1).mean()),
              density=float((1.0 / k) * inside.sum(axis=0).mean()),
              coverage=float((d.min(axis=1) < real_r).mean()))


# ------------------------------------------------------------------------------------------ judgements


def judge_set(candidate: np.ndarray, real_heldout: np.ndarray, *, feature_fn: Callable[[np.ndarray], np.ndarray] |
              None = None, seed: int = 0, folds: int = 5, cnn_steps: int = 300, prdc_k: int = 5,
              kid_subsets: int = 50) -> dict[str, float]:
  """Every judge of `candidate` against `real_heldout` (same H, W), as a flat dict of floats.

  Keys: `n_candidate`, `n_real`; `c2st_logistic_auc`, `c2st_statistics_auc`, `c2st_cnn_auc` (NaN when
  `cnn_steps` is 0) - out-of-fold AUCs with the real images as label 0 and the candidate as label 1 (0.5 =
  indistinguishable); `mean_map_corr`, `std_map_corr`, `hist_w1`, `spectrum_l2`, `tv` (candidate), `tv_real`
  (`pixel_statistics`). With `feature_fn` (images -> (N, D) features, e.g. a `JudgeNet`): `kid`, `kid_std`
  and `precision`, `recall`, `density`, `coverage` with the real images as the reference manifold."""
  gc, gr = _check_pair(candidate, real_heldout, ("candidate", "real_heldout"))
  c, r = gc[..., None], gr[..., None]
  out: dict[str, float] = dict(n_candidate=float(len(gc)), n_real=float(len(gr)))
  out["c2st_logistic_auc"] = c2st_logistic(r, c, folds=folds, seed=seed)
  out["c2st_statistics_auc"] = c2st_statistics(r, c, folds=folds, seed=seed)
  out["c2st_cnn_auc"] = (c2st_cnn(r, c, folds=folds, seed=seed, steps=cnn_steps) if cnn_steps > 0
                         else float("nan"))
  out.update(pixel_statistics(c, r, seed=seed))
  if feature_fn is not None:
    f_c, f_r = np.asarray(feature_fn(candidate)), np.asarray(feature_fn(real_heldout))
    k = kid(f_c, f_r, num_subsets=kid_subsets, seed=seed)
    out["kid"], out["kid_std"] = k["mean"], k["std"]
    out.update(prdc(f_r, f_c, k=prdc_k))
  return out


def _sample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  return x if len(x) == n else x[np.sort(rng.choice(len(x), n, replace=False))]


def judge_with_anchors(candidate: np.ndarray, real_heldout: np.ndarray, *, real_reference: np.ndarray,
                       generator_init: np.ndarray | None = None, feature_fn: Callable[[np.ndarray], np.ndarray] |
                       None = None, seed: int = 0, folds: int = 5, cnn_steps: int = 300, sigma: float = 1.5,
                       prdc_k: int = 5, kid_subsets: int = 50) -> dict[str, dict[str, float]]:
  """`judge_set` of the candidate and of anchors that give its numbers a scale, all against one held-out sample.

  n = the smallest size among `candidate`, `real_heldout`, `real_reference` (and `generator_init`); each set is
  subsampled to n (seeded, without replacement) and judged against the same n held-out real images:
  - 'candidate': the set under test;
  - 'real_vs_real': n images of `real_reference` - real images of the stage disjoint from `real_heldout` (e.g.
    the training split) - the best any replay set can do; its dict also holds `heldout_duplicates`, the number
    of sampled reference images that also appear, pixel for pixel, among the held-out sample (should be 0);
  - 'smoothed_noise': `smoothed_noise_like(real_reference, n, sigma=sigma)`, the floor to beat clearly;
  - 'generator_init' (if given): e.g. the untrained generator's output, what inversion started from."""
  sets = dict(candidate=_check_images("candidate", candidate, 2),
              real_heldout=_check_images("real_heldout", real_heldout, 2),
              real_reference=_check_images("real_reference", real_reference, 2))
  if generator_init is not None:
    sets["generator_init"] = _check_images("generator_init", generator_init, 2)
  n = min(len(v) for v in sets.values())
  rng = np.random.default_rng(seed)
  held = _sample(sets["real_heldout"], n, rng)
  judged = dict(candidate=_sample(sets["candidate"], n, rng), real_vs_real=_sample(sets["real_reference"], n, rng),
                smoothed_noise=smoothed_noise_like(sets["real_reference"], n, seed=seed, sigma=sigma))
  if generator_init is not None:
    judged["generator_init"] = _sample(sets["generator_init"], n, rng)
  kw = dict(feature_fn=feature_fn, seed=seed, folds=folds, cnn_steps=cnn_steps, prdc_k=prdc_k, kid_subsets=kid_subsets)
  out = {name: judge_set(images, held, **kw) for name, images in judged.items()}
  held_keys = {np.asarray(h, np.float32).tobytes() for h in held}
  out["real_vs_real"]["heldout_duplicates"] = float(sum(np.asarray(r, np.float32).tobytes() in held_keys
                                                         for r in judged["real_vs_real"]))
  return out
