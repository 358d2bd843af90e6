"""The retention benchmark's measurements as registered evaluators (measure.evaluators): `probe` (kNN and
logistic-regression probes of the frozen features), `reconstruction` (masked-reconstruction error with the
model's decoder and a re-fitted one), `judges` (independent judges of an image set against held-out images,
which the audit calls too). Each wraps the pure functions of retention/ and computes exactly what they do."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from invcoss_jax.measure.evaluators import Evaluator, register_evaluator
from invcoss_jax.retention import features, judges, metrics, reconstruction


@register_evaluator("probe")
class Probe(Evaluator):
  """Linear (logistic regression) and kNN probes of the encoder's pooled features (`features.encoder_features`),
  fitted on `fit` and scored on `test` (`metrics.probe_scores`: accuracy, balanced accuracy, AUC, ...)."""

  def __init__(self, model, fit: features.Split, test: features.Split, *, feature: str = "mean",
               batch_size: int = 256, logreg_c: float = 1.0, knn_k: int = 20, seed: int = 0):
    self.model, self.fit, self.test = model, fit, test
    self.feature, self.batch_size = str(feature), int(batch_size)
    self.logreg_c, self.knn_k, self.seed = float(logreg_c), int(knn_k), int(seed)

  def features(self, params, images: np.ndarray) -> np.ndarray:
    return features.encoder_features(self.model, params, images, kind=self.feature, batch_size=self.batch_size)

  def run(self, params) -> dict[str, float]:
    return metrics.probe_scores(self.features(params, self.fit.images), self.fit.labels,
                                self.features(params, self.test.images), self.test.labels,
                                logreg_c=self.logreg_c, knn_k=self.knn_k, seed=self.seed)


@register_evaluator("reconstruction")
class ReconstructionError(Evaluator):
  """Masked-reconstruction error on `test` under the fixed mask draws `noises` (draws, N, tokens): with the
  model's own decoder (`mae_mse`) and, with `refit_steps` > 0, with a fresh decoder (from `init_key`) re-fitted
  on the frozen encoder on `fit` (`mae_mse_refit`, `refit_loss_last`)."""

  def __init__(self, rec: reconstruction.Reconstruction, test: np.ndarray, noises: np.ndarray, *,
               fit: np.ndarray | None = None, refit_steps: int = 0, init_key: jax.Array | None = None,
               refit_key: jax.Array | None = None, refit_seed: int = 0):
    self.rec, self.test, self.noises, self.fit = rec, test, noises, fit
    self.refit_steps, self.init_key, self.refit_key, self.refit_seed = int(refit_steps), init_key, refit_key, refit_seed

  def run(self, params) -> dict[str, float]:
    rec = self.rec
    out = dict(mae_mse=rec.error(params, self.test, self.noises))
    if self.refit_steps > 0:
      refit, losses = rec.refit_decoder(params, reconstruction.fresh_decoder(rec.model.cfg, self.init_key), self.fit,
                                        steps=self.refit_steps, key=self.refit_key, seed=self.refit_seed)
      out["mae_mse_refit"] = rec.error(refit, self.test, self.noises)
      out["refit_loss_last"] = float(np.mean(losses[-10:]))
    return out


@register_evaluator("judges")
class Judges(Evaluator):
  """Every judge of an image set `images` against held-out real images (`judges.judge_set`: classifier
  two-sample tests, PRDC, KID, ...), in the features of `feature_fn` (a judge net) where given. The judges never
  read the measured model: `run` ignores its parameters."""

  def __init__(self, images: np.ndarray, held: np.ndarray, *, feature_fn: Callable | None = None, seed: int = 0,
               folds: int = 5, cnn_steps: int = 300, prdc_k: int = 5):
    self.images, self.held, self.feature_fn = images, held, feature_fn
    self.kw = dict(seed=int(seed), folds=int(folds), cnn_steps=int(cnn_steps), prdc_k=int(prdc_k))

  def run(self, params: Any = None) -> dict[str, float]:
    return judges.judge_set(self.images, self.held, feature_fn=self.feature_fn, **self.kw)
